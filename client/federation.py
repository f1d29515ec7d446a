"""Flower ClientApp: a customer site's part in federated rounds of the *global* Identity Net adapter.

Two levels of adapter, and only one of them is federated:

- **Global adapter** (federated). One LoRA (the Identity Net's rank/targets) on the base UNet, trained at every site
  on the face crops of the people whose `federated_training` consent holds *this round*, under the class prompt
  ("a photo of person"), with no identity token. It learns what the sites' photos share (faces, framing, lighting
  of real portrait photos) and is averaged across sites by the coordinator. Each round a site trains it locally
  with Opacus DP-SGD (per-photo clipping and noise, `client.identity.train_lora`), Flower's client-side clipping
  mod (`fixedclipping_mod`, or `adaptiveclipping_mod` when the coordinator runs adaptive clipping, only without
  SecAgg+) clips the site's whole update to the coordinator's clipping norm; with secure aggregation the site then
  adds its share of the federation's Gaussian noise (distributed DP, `clipping_mod`) and `secaggplus_mod` masks the
  update, so the coordinator only ever sees the noised sum over sites (without SecAgg+ the coordinator adds the
  noise). Every release is composed in the site's `SitePrivacyLedger` in three units (per photo, per person, per
  site; deploy/docs/privacy.md), and the site declines a round that would cross a budget of its own privacy policy.
- **Per-person adapters** (never federated). `personalise_adapter` starts from the latest global adapter this site
  received and fine-tunes it on one person's crops with the identity prompt ("a photo of sks person"). The result
  is an `IdentityAdapter` kept at the site (or sealed to a render node by client/payload.py under consent); no
  function in this module sends it anywhere.

Consent, every round: the person folders under the site's data folder are named by person_ref. At the budget query
and again right before training, the site asks its `ConsentLedger` (`eligible(..., "federated_training")`, each
answer audited) which people may take part *now*; only their photos go through intake and training, and cached
crops of anyone else are deleted. A revoked person is therefore out of the next round. A site with nobody eligible
(or with no consent ledger configured) declines the round: its budget answer and its training reply say
`declined = 1` with a `decline-reason`, it trains nothing and releases no epsilon, and its audit log gets a
`federation.train` entry with outcome "refused". A round it trains in gets a `federation.train` entry naming the
photos (by sha256) it trained on.

What leaves the site, per round (and nothing else; `outbox_audit_mod` writes every outgoing message to the site's
`outbox/` folder so the site can check this itself):

- the global adapter's LoRA arrays after local training, clipped (masked too under SecAgg+), in the same order and
  shapes the coordinator sent, with aggregation weight (`num_examples`) 1, whatever the number of crops: the
  coordinator's central noise covers the unweighted mean of the sites' clipped updates (a declined round sends
  back the arrays it received, with weight 0);
- a metrics record: `site-id`, `epsilon` (cumulative per-photo figure, from the Opacus accountant), `delta`,
  `steps`, `n-examples` (the number of crops rounded down to a power of ten, `examples_bucket`), `declined`,
  `decline-reason`, `audit-checkpoint` (the signed size and head hash of the site's audit log, which the coordinator
  keeps as its witness; hashes only); no training loss; with adaptive clipping (only without SecAgg+, to a trusted
  coordinator) also Flower's `norm_bit` (whether the update was clipped; the coordinator noises the count);
- answers to the coordinator's budget query: `site-id`, `epsilon`, `epsilon-next` (what the accountant says the
  next round would bring the site to), `n-examples` (bucketed), `declined`, `decline-reason`, `audit-checkpoint` (as
  above: a site that declines every round is witnessed too);
- under SecAgg+, the protocol's public keys, encrypted key shares and masked vectors.

Photos, crops, embeddings, per-person adapters, person refs and file names never leave.

Where a site's photos and consent records are (read from the Flower context, never sent):
- deployment (`flower-supernode --node-config`): `data-dir` (one sub-folder of photos per person, named by
  person_ref), `state-dir` (crop cache, privacy ledger, global adapter, outbox audit), optional `site-id` (default:
  the data folder's name); consent: `consent-ledger` (SQLite), `consent-key` (the site's Ed25519 key, which signed
  the receipts and signs its audit entries), optional `audit-log` (default `<state-dir>/audit.jsonl`) and
  `consent-policy` (default: the checkout's policies/consent.yaml). Without `consent-ledger` in the node config the
  `policy` section of `$MEGAPORTRAIT_CONFIG` is used when that variable is set (consent_ledger, audit_key,
  audit_log, consent_file); with neither, the site declines every round.
- simulation (node config has only `partition-id`): run config `sim-sites-dir` holds one folder per site (sorted;
  partition k takes the k-th), `sim-state-dir` one state folder per site, and `sim-consent` a JSON file mapping
  site id to its consent paths (written by `server.coordinator.deployment.simulate`). `sim-consent = "unchecked"`
  (what `simulate` sets when called without consent records, for callers that filtered consent themselves) makes
  simulated sites train on every person folder without asking a ledger, with a warning every round; deployed
  sites never read it.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from flwr.app import Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.client import NumPyClient
from flwr.client.mod import adaptiveclipping_mod, fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from megaportrait.shared.audit import WITNESS_DIR, WitnessStore
from megaportrait.shared.consent import FEDERATED_TRAINING_PURPOSE
from megaportrait.shared.errors import MegaPortraitError

log = logging.getLogger("megaportrait.client.federation")

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
METRIC_KEYS = ("site-id", "epsilon", "delta", "steps", "n-examples", "declined", "decline-reason", "audit-checkpoint")
PROPERTY_KEYS = ("site-id", "epsilon", "epsilon-next", "n-examples", "declined", "decline-reason", "audit-checkpoint")
LEDGER_FILE = "privacy-ledger.json"
GLOBAL_ADAPTER_FILE = "global-adapter.npz"
OUTBOX_DIR = "outbox"
FEDERATED_TRAINING = FEDERATED_TRAINING_PURPOSE
"""The consent purpose a person's photos need to take part in a round (policies/consent.yaml)."""
CONSENT_ACTOR = "federation-client"
"""Who the site's consent checks and round entries are recorded as, in its audit log."""
DECLINE_REASONS = ("consent_not_configured", "no_consented_person", "no_usable_photo", "privacy_budget")
DP_MODES = ("distributed", "central")
"""Where the federation's noise is added: at each site before SecAgg+ masking, or at the coordinator in the clear."""


def examples_bucket(n: int) -> int:
    """The crop count as it leaves the site: rounded down to a power of ten (0, 1, 10, 100, ...), never exact."""
    return 0 if n <= 0 else 10 ** int(math.floor(math.log10(n)))
DEFAULT_POLICY = Path(__file__).resolve().parents[1] / "policies" / "consent.yaml"
UNCHECKED = "unchecked"
"""Run config `sim-consent` value: simulated sites use every person folder without a consent check (warned)."""


class SiteError(MegaPortraitError):
    """A site cannot take part in a round: its configuration or data is unusable, or a round would break its
    privacy budget. `reason` says which."""

    reason = "site_error"


# --- where the site's data and consent records live -----------------------------------------------------------


@dataclass(frozen=True)
class SiteConsent:
    """Where a site's consent records are: the ledger (SQLite), the site's Ed25519 key (receipts were signed with
    it; it signs the audit entries), the audit log the checks go to, and the consent policy file."""

    ledger: Path
    key: Path
    audit_log: Path
    policy: Path = DEFAULT_POLICY

    @classmethod
    def in_folder(cls, folder: str | Path, policy: str | Path | None = None) -> "SiteConsent":
        """The standard layout of one folder: consent.sqlite, site.key, audit.jsonl."""
        folder = Path(folder)
        return cls(folder / "consent.sqlite", folder / "site.key", folder / "audit.jsonl",
                   Path(policy) if policy else DEFAULT_POLICY)

    def to_json(self) -> dict[str, str]:
        return {"ledger": str(self.ledger), "key": str(self.key), "audit-log": str(self.audit_log),
                "policy": str(self.policy)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SiteConsent":
        return cls(Path(data["ledger"]), Path(data["key"]), Path(data["audit-log"]),
                   Path(data.get("policy") or DEFAULT_POLICY))

    @contextmanager
    def open(self, site_id: str, component: str | None = None) -> Iterator[Any]:
        """The site's `ConsentLedger` (closed, and its audit log checkpointed, on exit); its audit entries are
        written as `component` (default: the federation client of `site_id`)."""
        from megaportrait.shared.audit import AuditLog, load_signing_key
        from megaportrait.shared.consent import ConsentLedger
        from megaportrait.shared.policy import load_consent_policy

        for what, path in (("consent ledger", self.ledger), ("consent key", self.key),
                           ("consent policy", self.policy)):
            if not path.is_file():
                raise SiteError(f"site {site_id}: {what} {path} does not exist; record consent at the site first "
                                "(or fix the site's consent paths)", reason="consent_config")
        key = load_signing_key(self.key)
        audit = AuditLog(self.audit_log, key, component=component or f"{CONSENT_ACTOR}:{site_id}")
        ledger = ConsentLedger(self.ledger, site=site_id, key=key, policy=load_consent_policy(self.policy),
                               audit=audit)
        try:
            yield ledger
        finally:
            ledger.close()
            audit.close()


@dataclass(frozen=True)
class SiteConfig:
    """A site's local folders. data_dir: one sub-folder of photos per person (named by person_ref). state_dir:
    what the site keeps between rounds (crop cache, privacy ledger, last global adapter, outbox audit). consent:
    where its consent records are (None: not configured, the site declines every round). consent_unchecked: a
    simulation whose caller checked consent itself (`sim-consent = "unchecked"`); every person folder is used."""

    site_id: str
    data_dir: Path
    state_dir: Path
    consent: SiteConsent | None = None
    consent_unchecked: bool = False
    privacy_policy: Path | None = None

    @property
    def outbox_dir(self) -> Path:
        return self.state_dir / OUTBOX_DIR


def site_from_context(context: Context) -> SiteConfig:
    """The site's folders from the node config (deployment) or the run config + partition id (simulation)."""
    node, run = context.node_config, context.run_config
    if "data-dir" in node:
        data_dir = Path(str(node["data-dir"])).expanduser()
        if "state-dir" not in node:
            raise SiteError("node config has data-dir but no state-dir; pass --node-config "
                            "'data-dir=\"...\" state-dir=\"...\"'", reason="site_config")
        site_id = str(node.get("site-id") or data_dir.name)
        state_dir = Path(str(node["state-dir"])).expanduser()
        consent, unchecked = consent_from_node_config(node, state_dir), False
    elif "partition-id" in node and str(run.get("sim-sites-dir", "")):
        sites_dir = Path(str(run["sim-sites-dir"])).expanduser()
        folders = sorted(p for p in sites_dir.iterdir() if p.is_dir()) if sites_dir.is_dir() else []
        pid = int(node["partition-id"])
        if pid >= len(folders):
            raise SiteError(f"simulation partition {pid} has no site folder in {sites_dir} ({len(folders)} found)",
                            reason="site_config")
        data_dir = folders[pid]
        site_id = data_dir.name
        state_root = Path(str(run.get("sim-state-dir") or sites_dir.with_name(sites_dir.name + "-state")))
        state_dir = state_root.expanduser() / site_id
        unchecked = str(run.get("sim-consent", "")) == UNCHECKED
        consent = None if unchecked else consent_from_simulation(run, site_id)
    else:
        raise SiteError("no site data configured: give the SuperNode --node-config 'data-dir=... state-dir=...' "
                        "or the simulation run config sim-sites-dir", reason="site_config")
    if not data_dir.is_dir():
        raise SiteError(f"site data folder {data_dir} does not exist", reason="site_config")
    state_dir.mkdir(parents=True, exist_ok=True)
    policy = str(node.get("privacy-policy", "") or "")
    return SiteConfig(site_id=site_id, data_dir=data_dir, state_dir=state_dir, consent=consent,
                      consent_unchecked=unchecked, privacy_policy=Path(policy).expanduser() if policy else None)


def consent_from_node_config(node: dict[str, Any], state_dir: Path) -> SiteConsent | None:
    """Consent paths from the node config, else from `$MEGAPORTRAIT_CONFIG`'s policy section, else None."""
    if "consent-ledger" in node:
        if "consent-key" not in node:
            raise SiteError("node config has consent-ledger but no consent-key (the site's Ed25519 key)",
                            reason="site_config")
        policy = str(node.get("consent-policy") or "")
        return SiteConsent(Path(str(node["consent-ledger"])).expanduser(), Path(str(node["consent-key"])).expanduser(),
                           Path(str(node.get("audit-log") or state_dir / "audit.jsonl")).expanduser(),
                           Path(policy).expanduser() if policy else DEFAULT_POLICY)
    if os.environ.get("MEGAPORTRAIT_CONFIG"):
        from megaportrait.shared.config import load_settings

        policy = load_settings().policy
        return SiteConsent(policy.consent_ledger, policy.audit_key, policy.audit_log, policy.consent_file)
    return None


def consent_from_simulation(run: dict[str, Any], site_id: str) -> SiteConsent | None:
    """A simulated site's consent paths from the JSON file named by run config `sim-consent` (None if absent)."""
    path = str(run.get("sim-consent", ""))
    if not path:
        return None
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SiteError(f"simulation consent map {path} is unreadable: {exc}", reason="site_config") from exc
    return SiteConsent.from_json(entries[site_id]) if site_id in entries else None


def record_federated_consent(consent: SiteConsent, site_id: str, person_refs: Iterable[str], *, actor: str,
                             granted_by: str = "subject") -> list[str]:
    """Create the site's key, audit log and ledger where `consent` says (a key that exists is reused) and record a
    signed `federated_training` grant for each person; returns the receipt ids. For simulations, tests and
    benchmarks: a real site records each grant when the person gives it."""
    from megaportrait.shared.audit import generate_signing_key

    if not consent.key.is_file():
        generate_signing_key(consent.key)
    consent.ledger.parent.mkdir(parents=True, exist_ok=True)
    consent.ledger.touch()
    with consent.open(site_id) as ledger:
        return [ledger.grant(ref, [FEDERATED_TRAINING], granted_by=granted_by, actor=actor).receipt_id
                for ref in person_refs]


def person_photos(data_dir: Path) -> dict[str, list[Path]]:
    """person folder name -> sorted photo paths; photos directly in `data_dir` count as one person "_"."""
    people: dict[str, list[Path]] = {}
    for p in sorted(data_dir.rglob("*")):
        if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES:
            person = p.parent.name if p.parent != data_dir else "_"
            people.setdefault(person, []).append(p)
    return people


@dataclass(frozen=True)
class SiteCrops:
    """A site's face crops. pixels: (N, S, S, 3) uint8 RGB; photo_sha256[i] and person[i] describe row i."""

    pixels: np.ndarray
    photo_sha256: tuple[str, ...]
    person: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.pixels.shape[0])


def load_site_crops(site: SiteConfig, crop_size: int, *, show_progress: bool = False,
                    people: Iterable[str] | None = None) -> SiteCrops:
    """Face crops of every accepted photo at the site (only of `people`, when given), from
    `client.faces.intake_photos`; cached in the state folder (`crops-<key>.npz`, key over the people, their photos'
    bytes and the crop size), so later rounds skip face analysis."""
    people_photos = person_photos(site.data_dir)
    if people is not None:
        wanted = set(people)
        people_photos = {p: paths for p, paths in people_photos.items() if p in wanted}
    cache = crop_cache_path(site, crop_size, people_photos)
    if cache.is_file():
        with np.load(cache) as z:
            return SiteCrops(z["pixels"], tuple(z["photo_sha256"].tolist()), tuple(z["person"].tolist()))

    from megaportrait.client.faces import intake_photos
    from megaportrait.shared.config import FaceSettings

    pixels, hashes, owners = [], [], []
    for person, paths in people_photos.items():
        report = intake_photos(paths, FaceSettings(crop_size=crop_size), show_progress=show_progress)
        for accepted in report.accepted:
            pixels.append(accepted.crop.pixels)
            hashes.append(accepted.image_sha256)
            owners.append(person)
        if report.rejected:
            log.warning("site %s: %d photo(s) rejected (%s)", site.site_id, len(report.rejected),
                        ", ".join(sorted({r.reason for r in report.rejected})))
    if not pixels:
        raise SiteError(f"site {site.site_id}: no usable face photo in its data folder"
                        + (" among the people asked for" if people is not None else ""), reason="no_photos")
    crops = SiteCrops(np.stack(pixels), tuple(hashes), tuple(owners))
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, pixels=crops.pixels, photo_sha256=np.array(crops.photo_sha256), person=np.array(crops.person))
    os.replace(tmp, cache)
    return crops


def crop_cache_path(site: SiteConfig, crop_size: int, people_photos: dict[str, list[Path]]) -> Path:
    """The cache file for these people's photos at this crop size."""
    digest = hashlib.sha256(str(crop_size).encode())
    for person, paths in sorted(people_photos.items()):
        for p in paths:
            digest.update(person.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return site.state_dir / f"crops-{digest.hexdigest()[:16]}.npz"


def drop_other_crop_caches(site: SiteConfig, keep: Path | None) -> list[Path]:
    """Delete every crop cache of the site but `keep`: cached crops of people who are not in this round's consented
    set (revoked, expired) do not outlive the round. Returns what was deleted."""
    gone = []
    for path in sorted(site.state_dir.glob("crops-*.npz")):
        if path != keep:
            path.unlink(missing_ok=True)
            gone.append(path)
    return gone


@dataclass(frozen=True)
class RoundData:
    """What a site may train on this round: the consented people's crops, or why it declines (`declined`)."""

    crops: SiteCrops | None
    people: tuple[str, ...]
    excluded: int
    declined: str = ""


def consented_round_data(site: SiteConfig, crop_size: int, *, stage: str) -> RoundData:
    """Ask the site's consent ledger who may take part in federated training now (every answer audited), and load
    only their crops. `stage` ("budget-query" or "train") goes into the log lines."""
    people = person_photos(site.data_dir)
    if site.consent is None and site.consent_unchecked:
        log.warning("site %s (%s): consent NOT checked (simulation started without consent records); training on "
                    "all %d person folder(s)", site.site_id, stage, len(people))
        try:
            return RoundData(load_site_crops(site, crop_size), tuple(sorted(people)), 0)
        except SiteError as exc:
            if exc.reason != "no_photos":
                raise
            return RoundData(None, tuple(sorted(people)), 0, "no_usable_photo")
    if site.consent is None:
        log.error("site %s: no consent ledger configured (node config consent-ledger/consent-key, "
                  "$MEGAPORTRAIT_CONFIG's policy section, or simulation sim-consent); declining the round",
                  site.site_id)
        return RoundData(None, (), len(people), "consent_not_configured")
    with site.consent.open(site.site_id) as ledger:
        eligible = tuple(sorted(ledger.eligible(sorted(people), FEDERATED_TRAINING, actor=CONSENT_ACTOR)))
    excluded = len(people) - len(eligible)
    if not eligible:
        log.warning("site %s (%s): nobody with %s consent among %d person folder(s); declining the round",
                    site.site_id, stage, FEDERATED_TRAINING, len(people))
        drop_other_crop_caches(site, None)
        return RoundData(None, (), excluded, "no_consented_person")
    try:
        crops = load_site_crops(site, crop_size, people=eligible)
    except SiteError as exc:
        if exc.reason != "no_photos":
            raise
        log.warning("site %s (%s): %s; declining the round", site.site_id, stage, exc)
        drop_other_crop_caches(site, None)
        return RoundData(None, eligible, excluded, "no_usable_photo")
    drop_other_crop_caches(site, crop_cache_path(site, crop_size, {p: people[p] for p in eligible}))
    return RoundData(crops, eligible, excluded)


# --- the site's privacy ledger -----------------------------------------------------------------------------


class SitePrivacyLedger:
    """Every DP release this site made, in the three units of `shared.accounting`.

    `history`: the global adapter's local DP-SGD runs; `personal`: personal adapters trained on the site's photos;
    `federation`: the federation's noise on each round the site's update went into (per-site unit). All three are
    Opacus accountant histories, (noise_multiplier, sample_rate, steps) per run; epsilon is always
    `accountant.get_epsilon(delta)` over them, never summed by hand. `largest_person` is the most photos any one
    person contributed to a round (the group size of the per-person figure). Stored as JSON in the site's state
    folder, so it survives rounds, runs and restarts (each ClientApp call may be a fresh process).
    """

    def __init__(self, path: Path, accountant: str = "rdp", delta: float = 1e-5) -> None:
        self.path = Path(path)
        self.accountant = accountant
        self.delta = delta
        self.history: list[tuple[float, float, int]] = []
        self.personal: list[tuple[float, float, int]] = []
        self.federation: list[tuple[float, float, int]] = []
        self.largest_person = 1
        self.rounds: list[dict[str, Any]] = []
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            self.accountant, self.delta = data["accountant"], float(data["delta"])
            self.history = [(float(a), float(b), int(c)) for a, b, c in data["history"]]
            self.personal = [(float(a), float(b), int(c)) for a, b, c in data.get("personal", [])]
            self.federation = [(float(a), float(b), int(c)) for a, b, c in data.get("federation", [])]
            self.largest_person = int(data.get("largest_person", 1))
            self.rounds = list(data.get("rounds", []))
        if delta != self.delta:
            log.warning("privacy ledger %s keeps delta %g (asked for %g): one delta per ledger", path, self.delta,
                        delta)

    def epsilon(self, extra: Sequence[tuple[float, float, int]] = ()) -> float:
        """Cumulative per-photo epsilon (global rounds and personal adapters) at the ledger's delta, with `extra`
        local DP-SGD releases added hypothetically."""
        from megaportrait.shared.accounting import epsilon

        return epsilon(self.history + self.personal + list(extra), self.delta, self.accountant)

    def figures(self, *, extra_global: Sequence[tuple[float, float, int]] = (),
                extra_federation: Sequence[tuple[float, float, int]] = (), largest_person: int | None = None) -> Any:
        """The site's `PrivacyFigures` (per photo, per person, per site), with hypothetical releases added."""
        from megaportrait.shared.accounting import figures

        k = max(self.largest_person, largest_person or 1)
        return figures(self.history + list(extra_global), self.personal, self.federation + list(extra_federation),
                       k, self.delta, self.accountant)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int, *,
               federation: tuple[float, float, int] | None = None, largest_person: int | None = None,
               **where: Any) -> float:
        """Append one global round's local DP-SGD release (and the federation noise it goes under), write the
        ledger atomically and return the new per-photo epsilon."""
        self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))
        if federation is not None:
            self.federation.append(tuple(federation))  # type: ignore[arg-type]
        if largest_person:
            self.largest_person = max(self.largest_person, int(largest_person))
        return self._save({"kind": "global", **where})

    def record_personal(self, noise_multiplier: float, sample_rate: float, steps: int, **where: Any) -> float:
        """Append one personal adapter's release (trained on this site's photos) and return the per-photo epsilon."""
        self.personal.append((float(noise_multiplier), float(sample_rate), int(steps)))
        return self._save({"kind": "personal", **where})

    def _save(self, where: dict[str, Any]) -> float:
        eps = self.epsilon()
        self.rounds.append({**where, "epsilon": eps, "at": time.time()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"accountant": self.accountant, "delta": self.delta, "history": self.history,
                                   "personal": self.personal, "federation": self.federation,
                                   "largest_person": self.largest_person, "rounds": self.rounds}, indent=1))
        os.replace(tmp, self.path)
        return eps


def site_privacy_policy(site: "SiteConfig", run_config: dict[str, Any]) -> Any:
    """The site's own privacy policy (its budgets): node config `privacy-policy`, else run config
    `privacy-policy`, else `$MEGAPORTRAIT_CONFIG`'s `policy.privacy_file` when that variable is set, else the
    checkout's policies/privacy.yaml."""
    from megaportrait.shared.policy import DEFAULT_PRIVACY_POLICY, load_privacy_policy

    path = str(site.privacy_policy or run_config.get("privacy-policy", "") or "")
    if not path and os.environ.get("MEGAPORTRAIT_CONFIG"):
        from megaportrait.shared.config import load_settings

        path = str(load_settings().policy.privacy_file)
    path = path or str(DEFAULT_PRIVACY_POLICY)
    return load_privacy_policy(Path(path).expanduser())


# --- training plan (from the run config, one place) --------------------------------------------------------


def identity_settings_from_run_config(run_config: dict[str, Any]) -> "IdentitySettings":  # noqa: F821
    """The IdentitySettings a federated round trains with; keys are [tool.flwr.app.config] in pyproject.toml."""
    from megaportrait.shared.config import IdentitySettings

    base_model = str(run_config.get("base-model", ""))
    return IdentitySettings(
        base_model=Path(base_model) if base_model else None,
        rank=int(run_config.get("lora-rank", 4)),
        alpha=float(run_config.get("lora-alpha", 4.0)),
        batch_size=int(run_config.get("batch-size", 4)),
        learning_rate=float(run_config.get("learning-rate", 1e-3)),
        resolution=int(run_config.get("resolution", 64)),
        dp_enabled=True,
        noise_multiplier=float(run_config.get("dp-noise-multiplier", 2.0)),
        max_grad_norm=float(run_config.get("dp-max-grad-norm", 1.0)),
        delta=float(run_config.get("dp-delta", 1e-5)),
        accountant=str(run_config.get("dp-accountant", "rdp")),
        seed=int(run_config.get("seed", 0)),
    )


def planned_sample_rate(n_examples: int, batch_size: int) -> float:
    """Poisson sample rate `train_lora` will use for `n_examples` rows: 1 / number of batches."""
    return 1.0 / math.ceil(n_examples / min(batch_size, n_examples))


def load_base(settings: "IdentitySettings", seed: int) -> Any:  # noqa: F821
    """The base model this federation trains on (the tiny embedded one unless `base-model` names a path)."""
    from megaportrait.shared.base_models import load_base_model

    return load_base_model(settings.base_model, config_dir=settings.base_model_config, seed=seed)


def global_training_set(components: dict[str, Any], crops: np.ndarray, settings: "IdentitySettings") -> Any:  # noqa: F821
    """`identity.prepare_training_set` with every crop paired with the class prompt ("a photo of person"): the
    global adapter carries no identity token (thin adapter over client/identity.py, which pairs crops with the
    identity prompt)."""
    from dataclasses import replace

    import torch

    from megaportrait.client.identity import prepare_training_set

    ts = prepare_training_set(components, list(crops), settings)
    return replace(ts, prompt_index=torch.ones_like(ts.prompt_index))


def initial_global_arrays(settings: "IdentitySettings", seed: int) -> tuple[list[np.ndarray], list[str], str]:  # noqa: F821
    """The round-0 global adapter: a fresh LoRA (seeded; lora_B = 0, so the UNet is unchanged) on the base UNet.
    Returns (arrays, parameter names, base model sha256). Built by the coordinator; it depends on no photo."""
    import torch

    from megaportrait.client.identity import attach_lora, detach_lora, get_lora_arrays, lora_parameter_names

    base = load_base(settings, seed)
    torch.manual_seed(seed)
    unet = attach_lora(base.components["unet"], settings)
    try:
        return get_lora_arrays(unet), lora_parameter_names(unet), base.ref.sha256
    finally:
        detach_lora(unet)


# --- the Flower client -------------------------------------------------------------------------------------


class GlobalAdapterClient(NumPyClient):
    """Answers the coordinator's budget query (`get_properties`) and trains the global adapter (`fit`), each time
    on the people whose federated-training consent holds at that moment."""

    def __init__(self, site: SiteConfig, run_config: dict[str, Any], run_id: int) -> None:
        self.site = site
        self.run_config = run_config
        self.run_id = run_id
        self.settings = identity_settings_from_run_config(run_config)
        self.local_steps = int(run_config.get("local-steps", 4))
        self.policy = site_privacy_policy(site, run_config)
        self.ledger = SitePrivacyLedger(site.state_dir / LEDGER_FILE, self.policy.rules.accountant,
                                        self.policy.rules.delta)

    def _round_data(self, stage: str, config: dict[str, Any] | None = None) -> RoundData:
        """The consented people's crops, or a decline; `privacy_budget` when one more round (with `config`'s
        steps and federation noise) would take the site past a budget of its own privacy policy."""
        from dataclasses import replace

        data = consented_round_data(self.site, self.settings.resolution, stage=stage)
        if data.declined or config is None:
            return data
        over = self._over_budget(data.crops, config)
        if over:
            log.warning("site %s declines (%s): %s", self.site.site_id, stage, over)
            return replace(data, declined="privacy_budget")
        return data

    def _over_budget(self, crops: "SiteCrops", config: dict[str, Any]) -> str:
        """Which of the site's budgets (per photo, per person, per site) one more round would cross, or ""."""
        steps = int(config.get("local-steps", self.local_steps))
        z = float(config.get("federation-noise-multiplier", 0.0))
        largest = max(collections.Counter(crops.person).values())
        after = self.ledger.figures(extra_global=[self._next_release(len(crops), steps)],
                                    extra_federation=[(z, 1.0, 1)], largest_person=largest)
        budgets = self.policy.budgets
        crossed = [f"{unit} epsilon {getattr(after, unit):.3g} > budget {getattr(budgets, unit):g}"
                   for unit in ("per_photo", "per_person", "per_site")
                   if getattr(after, unit) > getattr(budgets, unit)]
        return "; ".join(crossed)

    def _next_release(self, n: int, steps: int) -> tuple[float, float, int]:
        return (float(self.settings.noise_multiplier), planned_sample_rate(n, self.settings.batch_size), steps)

    def get_properties(self, config: dict[str, Any]) -> dict[str, Any]:
        steps = int(config.get("local-steps", self.local_steps))
        data = self._round_data("budget-query", config)
        eps = self.ledger.epsilon()
        if data.declined:
            checkpoint = self._audit_round(int(config.get("server-round", 0)), "refused", data,
                                           detail={"stage": "budget-query", "reason": data.declined})
            return {"site-id": self.site.site_id, "epsilon": eps, "epsilon-next": eps, "n-examples": 0,
                    "declined": 1, "decline-reason": data.declined, "audit-checkpoint": checkpoint}
        n = len(data.crops)
        return {"site-id": self.site.site_id, "epsilon": eps,
                "epsilon-next": self.ledger.epsilon([self._next_release(n, steps)]),
                "n-examples": examples_bucket(n), "declined": 0, "decline-reason": "",
                "audit-checkpoint": self._audit_checkpoint()}

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        raise SiteError("sites do not provide initial parameters; the coordinator builds the global adapter",
                        reason="no_initial_parameters")

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        steps = int(config.get("local-steps", self.local_steps))
        server_round = int(config.get("server-round", 0))
        WitnessStore(self.site.state_dir / WITNESS_DIR).keep_text(str(config.get("audit-checkpoint", "")))  # coordinator's
        data = self._round_data("train", config)
        if data.declined:
            return self._decline(parameters, server_round, data)
        crops = data.crops
        release = self._next_release(len(crops), steps)
        projected = self.ledger.epsilon([release])
        budget = float(config.get("epsilon-budget", math.inf))
        if projected > budget:
            raise SiteError(f"site {self.site.site_id}: round {server_round} would bring epsilon to {projected:.3g}, "
                            f"over the coordinator's budget {budget:.3g}; refusing to train",
                            reason="budget_exhausted")

        import torch

        from megaportrait.client.identity import attach_lora, detach_lora, get_lora_arrays, set_lora_arrays, \
            train_lora

        torch.set_num_threads(int(self.run_config.get("site-threads", 1)))
        base = load_base(self.settings, int(self.run_config.get("seed", 0)))
        expected = str(config.get("base-model-sha256", ""))
        if expected and expected != base.ref.sha256:
            raise SiteError(f"site {self.site.site_id}: base model {base.ref.sha256[:12]} differs from the "
                            f"coordinator's {expected[:12]}", reason="base_model_mismatch")
        ts = global_training_set(base.components, crops.pixels, self.settings)
        unet = attach_lora(base.components["unet"], self.settings)
        try:
            set_lora_arrays(unet, parameters)
            self._save_global(parameters, server_round)
            losses, report = train_lora(base.components, ts, self.settings, steps=steps, progress=False)
            arrays = get_lora_arrays(unet)
        finally:
            detach_lora(unet)
        # The release happened: account for it before anything is sent.
        z_fed = float(config.get("federation-noise-multiplier", 0.0))
        eps = self.ledger.record(report.noise_multiplier, report.sample_rate, report.steps, run=str(self.run_id),
                                 round=server_round, n_examples=len(crops), federation=(z_fed, 1.0, 1),
                                 largest_person=max(collections.Counter(crops.person).values()))
        checkpoint = self._audit_round(server_round, "ok", data, detail={"stage": "train", "epsilon": eps,
                                                                        "steps": report.steps, "n_examples": len(crops)},
                                       photos=sorted(set(crops.photo_sha256)))
        log.info("site %s round %d: %d crops of %d consented people, %d DP steps, epsilon %.3g", self.site.site_id,
                 server_round, len(crops), len(data.people), report.steps, eps)
        # Nothing unaccounted leaves: no training loss, the crop count only as a power-of-ten bucket.
        metrics = {"site-id": self.site.site_id, "epsilon": eps, "delta": self.ledger.delta, "steps": report.steps,
                   "n-examples": examples_bucket(len(crops)), "declined": 0, "decline-reason": "",
                   "audit-checkpoint": checkpoint}
        return arrays, len(crops), metrics

    def _decline(self, parameters: list[np.ndarray], server_round: int, data: RoundData
                 ) -> tuple[list[np.ndarray], int, dict]:
        """No training: the arrays go back as received, with weight 0 and `declined = 1` (the coordinator leaves
        the reply out of the aggregate; under SecAgg+ weight 0 adds nothing to the masked sum)."""
        checkpoint = self._audit_round(server_round, "refused", data, detail={"stage": "train", "reason": data.declined})
        log.warning("site %s declines round %d: %s", self.site.site_id, server_round, data.declined)
        metrics = {"site-id": self.site.site_id, "epsilon": self.ledger.epsilon(), "delta": self.ledger.delta,
                   "steps": 0, "n-examples": 0, "declined": 1,
                   "decline-reason": data.declined, "audit-checkpoint": checkpoint}
        return [np.asarray(a) for a in parameters], 0, metrics

    def _audit_round(self, server_round: int, outcome: str, data: RoundData, *, detail: dict[str, Any],
                     photos: Sequence[str] = ()) -> str:
        """A `federation.train` entry in the site's audit log: the photos trained on (by sha256), or the decline
        (at the budget query or at training). Returns the log's signed checkpoint after it, as text ("" without a
        log), for the round metrics."""
        if self.site.consent is None:
            return ""  # nowhere to write it; the decline is logged as an error above
        with self.site.consent.open(self.site.site_id) as ledger:
            ledger.audit.append("federation.train", actor=CONSENT_ACTOR, outcome=outcome, data=list(photos),
                                policy=ledger.policy.version_hash,
                                detail={"run": str(self.run_id), "round": server_round, "photos": len(photos),
                                        "people": len(data.people), "excluded_people": data.excluded, **detail})
            return ledger.audit.current_checkpoint().to_text()

    def _audit_checkpoint(self) -> str:
        """The site's audit log's signed checkpoint as text ("" without a log): what the coordinator witnesses."""
        if self.site.consent is None:
            return ""
        with self.site.consent.open(self.site.site_id) as ledger:
            return ledger.audit.current_checkpoint().to_text()

    def _save_global(self, arrays: Sequence[np.ndarray], server_round: int) -> None:
        """Keep the latest global adapter received, for `personalise_adapter`."""
        path = self.site.state_dir / GLOBAL_ADAPTER_FILE
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, *arrays, server_round=np.int64(server_round))
        os.replace(tmp, path)


def client_fn(context: Context):
    site = site_from_context(context)
    return GlobalAdapterClient(site, dict(context.run_config), context.run_id).to_client()


# --- mods ----------------------------------------------------------------------------------------------------


def message_wire_bytes(message: Message) -> bytes:
    """The bytes Flower pushes for `message`: every object of its object tree, deflated, children first."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return b"".join(obj.deflate() for obj in get_all_nested_objects(message).values())


def outbox_audit_mod(msg: Message, ctx: Context, call_next: Any) -> Message:
    """Outermost mod: write every message this site sends, exactly as it goes out, to `<state-dir>/outbox/`
    (`<run>-<n>.bin` plus a line in `outbox.jsonl` with type, round, size and sha256), so the site can audit what
    left it. It only observes; the reply passes through unchanged."""
    stage = _secagg_stage(msg)  # read first: secaggplus_mod consumes it
    reply = call_next(msg, ctx)
    try:
        site = site_from_context(ctx)
    except SiteError:
        return reply
    outbox = site.outbox_dir
    outbox.mkdir(parents=True, exist_ok=True)
    blob = message_wire_bytes(reply) if reply.has_content() else b""
    index = outbox / "outbox.jsonl"
    seq = index.read_text().count("\n") if index.is_file() else 0
    name = f"{ctx.run_id}-{seq:05d}.bin"
    (outbox / name).write_bytes(blob)
    entry = {"file": name, "run": str(ctx.run_id), "type": msg.metadata.message_type, "group": msg.metadata.group_id,
             "secagg_stage": stage, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
             "error": reply.error.reason if reply.has_error() else None,
             "records": describe_records(reply) if reply.has_content() else {}, "at": time.time()}
    with index.open("a") as fh:
        fh.write(json.dumps(entry) + "\n")
    return reply


def describe_records(message: Message) -> dict[str, Any]:
    """The shape of a message's content, for the outbox audit: per record its kind and keys (array shapes and
    dtypes for arrays, value types for configs, values for metrics)."""
    out: dict[str, Any] = {}
    content = message.content
    for name, record in content.array_records.items():
        out[name] = {"kind": "arrays", "items": {k: [list(a.shape), a.dtype] for k, a in record.items()}}
    for name, record in content.config_records.items():
        out[name] = {"kind": "config", "items": {k: type(v).__name__ for k, v in record.items()}}
    for name, record in content.metric_records.items():
        out[name] = {"kind": "metrics", "items": {k: v for k, v in record.items()}}
    return out


def _secagg_stage(msg: Message) -> str | None:
    cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    return str(cfg["stage"]) if cfg is not None and "stage" in cfg else None


def optional_secaggplus_mod(msg: Message, ctx: Context, call_next: Any) -> Message:
    """Flower's `secaggplus_mod` for messages of the SecAgg+ workflow; any other message passes straight on, so
    one ClientApp serves runs with and without secure aggregation."""
    if msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctx, call_next)
    return call_next(msg, ctx)


def is_declined(reply: Message) -> bool:
    """True for a training reply in which the site declined the round (see `GlobalAdapterClient._decline`)."""
    if reply.has_error() or not reply.has_content():
        return False
    return bool(compat.recorddict_to_fitres(reply.content, keep_input=True).metrics.get("declined", 0))


def clipping_mod(msg: Message, ctx: Context, call_next: Any) -> Message:
    """Flower's client-side clipping of the site's update: `adaptiveclipping_mod` when the coordinator's training
    request says `clipping = "adaptive"`, `fixedclipping_mod` otherwise (both take the norm from the request).

    The clipped reply goes on with `num_examples = UNIT_WEIGHT` (1): the coordinator's noise is calibrated to the
    unweighted mean of the clipped updates, and under SecAgg+ `secaggplus_mod` (outside this mod) multiplies the
    update by this weight before masking, where the coordinator cannot re-weight it. The number of crops stays in
    the `n-examples` metric.

    A declined reply carries the received arrays unchanged: there is no update to clip (Flower's mods would divide
    by its zero norm), so it is handed on as the site built it (weight 0).

    Distributed DP (`dp-mode = "distributed"`, the coordinator's choice under SecAgg+): after clipping to C, the
    site adds its share of the federation's Gaussian noise, stddev z * C / sqrt(min-sites), drawn from
    `os.urandom` (`shared.dp_noise`), before `secaggplus_mod` masks the update. With at least `min-sites` sites in
    the sum (the coordinator drops a round with fewer) the unmasked sum carries noise of stddev >= z * C, so the
    coordinator never sees an un-noised sum."""
    if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
        return call_next(msg, ctx)
    config = compat.recorddict_to_fitins(msg.content, keep_input=True).config
    mode = str(config.get("clipping", "fixed"))
    if mode not in CLIPPING_MODES:
        raise SiteError(f"coordinator asked for clipping {mode!r}; this site knows {', '.join(CLIPPING_MODES)}",
                        reason="site_config")
    flower_mod = adaptiveclipping_mod if mode == "adaptive" else fixedclipping_mod
    declined: list[Message] = []

    def client(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if is_declined(reply):
            declined.append(reply)
            # Flower's clipping mods pass an error reply through untouched; the real reply is returned below.
            return Message(Error(code=0, reason="declined"), reply_to=m)
        return reply

    out = flower_mod(msg, ctx, client)
    if declined:
        return declined[0]
    if out.has_error() or not out.has_content():
        return out
    res = compat.recorddict_to_fitres(out.content, keep_input=True)
    res.num_examples = UNIT_WEIGHT
    dp_mode = str(config.get("dp-mode", "central"))
    if dp_mode not in DP_MODES:
        raise SiteError(f"coordinator asked for dp-mode {dp_mode!r}; this site knows {', '.join(DP_MODES)}",
                        reason="site_config")
    if dp_mode == "distributed":
        res.parameters = ndarrays_to_parameters(add_distributed_noise(parameters_to_ndarrays(res.parameters),
                                                                      config))
    out.content = compat.fitres_to_recorddict(res, keep_input=True)
    return out


def distributed_noise_stddev(config: dict[str, Any]) -> float:
    """This site's share of the federation noise: z * C / sqrt(min-sites), from the round's instructions."""
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    z = float(config.get("federation-noise-multiplier", 0.0))
    norm = float(config.get(KEY_CLIPPING_NORM, 0.0))
    n_min = int(config.get("min-sites", 0))
    if not (z > 0 and norm > 0 and n_min >= 1):
        raise SiteError(f"distributed DP needs federation-noise-multiplier > 0, a clipping norm and min-sites >= 1 in "
                        f"the round's instructions (got {z}, {norm}, {n_min})", reason="site_config")
    return z * norm / math.sqrt(n_min)


def add_distributed_noise(arrays: list[np.ndarray], config: dict[str, Any]) -> list[np.ndarray]:
    """The clipped update with this site's share of the noise added, from the OS CSPRNG."""
    from megaportrait.shared.dp_noise import add_secure_gaussian

    return add_secure_gaussian(arrays, distributed_noise_stddev(config))


CLIPPING_MODES = ("fixed", "adaptive")
UNIT_WEIGHT = 1
"""The aggregation weight a site's clipped update is sent with (server/coordinator/strategy.py's `UNIT_WEIGHT`)."""

app = ClientApp(client_fn=client_fn, mods=[outbox_audit_mod, optional_secaggplus_mod, clipping_mod])


# --- per-person adapters (local only) ------------------------------------------------------------------------


def load_global_adapter(state_dir: Path) -> tuple[list[np.ndarray], int]:
    """The latest global adapter this site received: (arrays, server round)."""
    path = Path(state_dir) / GLOBAL_ADAPTER_FILE
    if not path.is_file():
        raise SiteError(f"no global adapter at {path}: take part in a federated round first", reason="no_global")
    with np.load(path) as z:
        keys = sorted((k for k in z.files if k.startswith("arr_")), key=lambda k: int(k[4:]))
        return [z[k] for k in keys], int(z["server_round"])


def personalise_adapter(crops: Sequence[Any], settings: "IdentitySettings", *, person_ref: str,  # noqa: F821
                        global_arrays: Sequence[np.ndarray], photo_sha256: Sequence[str] | None = None,
                        base: Any = None, steps: int | None = None, progress: bool = False,
                        dp_noise_seed: int | None = None, ledger: Any = None,
                        actor: str = "site", privacy_ledger: "SitePrivacyLedger | None" = None,
                        per_photo_budget: float | None = None) -> "IdentityAdapter":  # noqa: F821
    """A person's adapter, fine-tuned locally from the global adapter on that person's crops with the identity
    prompt. It stays at the site: nothing here sends it, and the federated client never reads it.

    ledger: the site's `ConsentLedger`; when given, the person's `personal_adapter` consent is required before
    training and again after it (consent ended meanwhile: the adapter is discarded and the ConsentError raised),
    as `client.identity.train_identity_adapter` does. Without it the caller must have checked consent.
    The returned PrivacyReport covers this personalisation run only; the person's photos also took part in the
    site's global rounds. With `privacy_ledger` (the site's) the run is composed into it, and with
    `per_photo_budget` a run that would take the site's per-photo epsilon past it is refused before training.
    """
    from megaportrait.client.identity import _validated_crops, attach_lora, detach_lora, lora_state_dict, \
        prepare_training_set, set_lora_arrays, train_lora
    from megaportrait.shared.consent import PERSONAL_ADAPTER_PURPOSE, ConsentError
    from megaportrait.shared.records import IdentityAdapter

    if ledger is not None:
        ledger.require(person_ref, PERSONAL_ADAPTER_PURPOSE, actor=actor)
    arrays, hashes = _validated_crops(crops, photo_sha256)
    if privacy_ledger is not None and per_photo_budget is not None and settings.dp_enabled:
        planned = (float(settings.noise_multiplier or 0.0), planned_sample_rate(len(arrays), settings.batch_size),
                   int(steps if steps is not None else settings.steps))
        projected = privacy_ledger.epsilon([planned])
        if projected > per_photo_budget:
            raise SiteError(f"personal adapter refused: it would take the site's per-photo epsilon to "
                            f"{projected:.3g}, over its budget {per_photo_budget:g} (policies/privacy.yaml)",
                            reason="privacy_budget")
    base = base if base is not None else load_base(settings, 0)
    ts = prepare_training_set(base.components, arrays, settings)
    unet = attach_lora(base.components["unet"], settings)
    try:
        set_lora_arrays(unet, global_arrays)
        _, report = train_lora(base.components, ts, settings, steps=steps, progress=progress,
                               dp_noise_seed=dp_noise_seed)
        state = lora_state_dict(unet)
    finally:
        detach_lora(unet)
    if ledger is not None:
        try:
            ledger.require(person_ref, PERSONAL_ADAPTER_PURPOSE, actor=actor)
        except ConsentError:
            state.clear()  # consent ended during training: the adapter is not kept
            raise
    if privacy_ledger is not None:
        if report.epsilon is None:
            privacy_ledger.record_personal(0.0, report.sample_rate, report.steps, person=person_ref[:12])
        else:
            privacy_ledger.record_personal(report.noise_multiplier, report.sample_rate, report.steps,
                                           person=person_ref[:12])
    return IdentityAdapter(person_ref=person_ref, token=settings.token, rank=settings.rank, alpha=settings.alpha,
                           target_modules=tuple(settings.target_modules), lora_state=state, base_model=base.ref,
                           privacy=report, photo_sha256=hashes)
