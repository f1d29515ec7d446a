"""Who the demo's sites hold and which templates it renders onto, with where every image comes from.

Default people, when the shared photo set is found ($MEGAPORTRAIT_DATA, else ../shared/data beside the repository):
the two few-shot people (people/obama: 4 photos, people/biden: 2), scikit-image's astronaut portrait (1 photo), and,
to give every site a few people, the sitters of template portraits that are *not* rendered onto (1 photo each).
Main people go round-robin over the sites, sitters fill the remaining places. A few deliberately bad uploads (a photo
with several faces from hard/, a truncated copy of a real photo, a photo without a face) are added so intake shows
its refusals. Every person consents to everything except the last sitter, who consents to training only, so the
report shows a render refused for missing consent.

With `--photos DIR` the user's people take site-a (each sub-folder one person; photos directly in DIR one person);
with `--template IMG` that image is the only template. Nothing here is shipped with the project: the astronaut and
the coffee photo come from scikit-image (public domain / CC0), everything else from the folders named.
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megaportrait.shared.errors import PhotoRejected

from .settings import DemoError, DemoSettings

log = logging.getLogger("megaportrait.demo")

ALL_PURPOSES = ("personal_adapter", "federated_training", "render", "classic_face_crop_payload")
TRAINING_ONLY = ("personal_adapter", "federated_training")
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
ASTRONAUT_PROVENANCE = ("scikit-image skimage.data.astronaut(): NASA photograph of astronaut Eileen Collins, "
                        "no known copyright restrictions (public domain)")
COFFEE_PROVENANCE = "scikit-image skimage.data.coffee(): photo of a coffee cup, CC0 (Rachel Michetti)"


@dataclass(frozen=True)
class Upload:
    """One file handed to a site for a person; `note` says why a deliberately bad one is there."""

    path: Path
    note: str = ""


@dataclass
class PersonPlan:
    """A person as the demo sets them up: display name (stays in the local report; logs use the ref), site, the
    files uploaded, where they come from, and the consent purposes they grant."""

    name: str
    site: str
    uploads: list[Upload]
    provenance: str
    purposes: tuple[str, ...] = ALL_PURPOSES
    consent_note: str = ""


@dataclass
class TemplateInfo:
    """A template portrait with its analysed face and skin tone (ITA, degrees)."""

    name: str
    path: Path
    image: object  # SourceImage
    face: object  # FaceRecord
    ita: float
    band: str
    provenance: str


@dataclass
class Roster:
    """Sites (ids in order), people, templates to render onto, whose consent is revoked, and notes for the report."""

    sites: list[str]
    people: list[PersonPlan]
    templates: list[TemplateInfo]
    revoke: str
    data_dir: Path | None
    notes: list[str] = field(default_factory=list)

    def at(self, site: str) -> list[PersonPlan]:
        return [p for p in self.people if p.site == site]


def site_ids(n: int) -> list[str]:
    """site-a, site-b, ... for n sites."""
    return [f"site-{chr(ord('a') + k)}" for k in range(n)]


def find_data_dir(explicit: Path | None = None) -> Path | None:
    """The shared photo set: `explicit`, else $MEGAPORTRAIT_DATA, else ../shared/data beside the repository or the
    current folder; None when none holds people/ and templates/."""
    candidates = [explicit] if explicit is not None else []
    if os.environ.get("MEGAPORTRAIT_DATA"):
        candidates.append(Path(os.environ["MEGAPORTRAIT_DATA"]))
    candidates += [Path(__file__).resolve().parents[2].parent / "shared" / "data",
                   Path.cwd().parent / "shared" / "data"]
    for c in candidates:
        if c is not None and (c / "people").is_dir() and (c / "templates").is_dir():
            return c.resolve()
    if explicit is not None:
        raise DemoError(f"data folder {explicit} has no people/ and templates/ sub-folders")
    return None


def manifest_provenance(data_dir: Path) -> dict[str, tuple[str, str]]:
    """file (relative to the data folder) -> (source, licence) from its MANIFEST.csv (empty when absent)."""
    path = data_dir / "MANIFEST.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        return {row["file"]: (row["source"], row["licence"]) for row in csv.DictReader(fh)}


def provenance_of(files: list[str], manifest: dict[str, tuple[str, str]]) -> str:
    """One line for several files of the data folder: their repositories and licences, each named once."""
    known = [manifest[f] for f in files if f in manifest]
    if not known:
        return f"shared photo set ({len(files)} file(s), not in its MANIFEST.csv)"
    repos = sorted({source.split(" : ")[0] for source, _ in known})
    licences = sorted({licence for _, licence in known})
    missing = len(files) - len(known)
    return (f"{'; '.join(repos)} ({len(known)} file(s)" + (f", {missing} not in MANIFEST.csv" if missing else "")
            + f"): {' '.join(licences)}")


def analyse_template(path: Path, analyzer, provenance: str) -> TemplateInfo:
    """Load a template and measure its face; DemoError (naming the file) when it has no usable face."""
    from megaportrait.shared.imaging import load_image
    from megaportrait.shared.skin_tone import face_ita, ita_band

    try:
        image = load_image(path)
    except PhotoRejected as exc:
        raise DemoError(f"template {path}: {exc.reason}: {exc.detail}", reason="template_unusable") from exc
    faces = analyzer.analyze(image, largest_only=True)
    if not faces:
        raise DemoError(f"template {path}: no face found; choose a portrait with one clearly visible face",
                        reason="template_unusable")
    if faces[0].mesh is None:
        raise DemoError(f"template {path}: the face mesh did not fit, so skin tone cannot be measured",
                        reason="template_unusable")
    ita = face_ita(image.pixels, faces[0])
    return TemplateInfo(name=path.stem, path=path, image=image, face=faces[0], ita=ita, band=ita_band(ita),
                        provenance=provenance)


def spread(items: list, k: int) -> list:
    """k items evenly spaced over `items` (kept in their order)."""
    if k >= len(items):
        return list(items)
    idx = np.linspace(0, len(items) - 1, k).round().astype(int)
    return [items[i] for i in dict.fromkeys(idx.tolist())]


def _user_people(photos_dir: Path) -> list[tuple[str, list[Path]]]:
    if not photos_dir.is_dir():
        raise DemoError(f"--photos {photos_dir}: not a folder (give a folder with one sub-folder of photos per person, "
                        "or the photos of one person)")
    files = sorted(p for p in photos_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    out = [(photos_dir.name, files)] if files else []
    for sub in sorted(p for p in photos_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        sub_files = sorted(p for p in sub.iterdir() if p.is_file() and not p.name.startswith("."))
        if sub_files:
            out.append((sub.name, sub_files))
    if not out:
        raise DemoError(f"--photos {photos_dir}: no files in it or its sub-folders")
    return out


def check_inputs(settings: DemoSettings) -> None:
    """Refuse missing user inputs before anything is created (DemoError naming the option)."""
    if settings.photos_dir is not None and not Path(settings.photos_dir).is_dir():
        raise DemoError(f"--photos {settings.photos_dir}: not a folder (give a folder with one sub-folder of photos "
                        "per person, or the photos of one person)")
    if settings.template is not None and not Path(settings.template).is_file():
        raise DemoError(f"--template {settings.template}: no such file")
    if settings.data_dir is not None:
        find_data_dir(settings.data_dir)


def build_roster(settings: DemoSettings, analyzer, uploads_dir: Path) -> Roster:
    """Choose sites, people and templates; write the generated uploads (astronaut, bad files) to `uploads_dir`."""
    import skimage.data
    from PIL import Image

    uploads_dir.mkdir(parents=True, exist_ok=True)
    data_dir = find_data_dir(settings.data_dir)
    provenance = manifest_provenance(data_dir) if data_dir else {}
    notes: list[str] = []
    sites = site_ids(settings.n_sites)

    # Templates: the user's one, or the shared set spread over skin tone; the rest may be people.
    if settings.template is not None:
        if not Path(settings.template).is_file():
            raise DemoError(f"--template {settings.template}: no such file")
        templates = [analyse_template(Path(settings.template), analyzer, "the user's template (--template)")]
        spare: list[TemplateInfo] = []
    elif data_dir is not None:
        analysed = []
        for path in sorted((data_dir / "templates").glob("*.jpg")):
            try:
                source = provenance_of([f"templates/{path.name}"], provenance)
                analysed.append(analyse_template(path, analyzer, source))
            except DemoError as exc:
                notes.append(f"template {path.name} left out: {exc}")
        if not analysed:
            raise DemoError(f"{data_dir / 'templates'} holds no usable template portrait")
        analysed.sort(key=lambda t: -t.ita)
        templates = spread(analysed, settings.n_templates)
        spare = [t for t in analysed if t not in templates]
    else:
        raise DemoError("no template portrait: pass --template IMG, or place the shared photo set at ../shared/data "
                        "(or set MEGAPORTRAIT_DATA)")

    astronaut = uploads_dir / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(astronaut)
    coffee = uploads_dir / "coffee.png"
    if settings.photos_dir is None:
        Image.fromarray(skimage.data.coffee()).save(coffee)

    main: list[PersonPlan] = []
    if data_dir is not None:
        for name in ("obama", "biden"):
            files = sorted((data_dir / "people" / name).glob("*.jpg"))
            if files:
                src = provenance_of([f"people/{name}/{f.name}" for f in files], provenance)
                main.append(PersonPlan(name, "", [Upload(f) for f in files], src))
    main.append(PersonPlan("astronaut", "", [Upload(astronaut)], ASTRONAUT_PROVENANCE))
    sitters = [PersonPlan(f"sitter-{t.name}", "", [Upload(t.path)],
                          f"template portrait {t.path.name} (not rendered onto): {t.provenance}") for t in spare]

    people: list[PersonPlan] = []
    open_sites = list(sites)
    if settings.photos_dir is not None:
        for name, files in _user_people(Path(settings.photos_dir)):
            people.append(PersonPlan(name, sites[0], [Upload(f) for f in files],
                                     f"the user's photos ({settings.photos_dir})"))
        open_sites = sites[1:]
    for k, person in enumerate(main[: len(open_sites) * settings.people_per_site]):
        person.site = open_sites[k % len(open_sites)]
        people.append(person)
    for site in open_sites:
        while len([p for p in people if p.site == site]) < settings.people_per_site and sitters:
            person = sitters.pop(0)
            person.site = site
            people.append(person)

    # Deliberately bad uploads, so intake's refusals show (default people only).
    by_name = {p.name: p for p in people}
    if data_dir is not None and settings.photos_dir is None:
        two = data_dir / "hard" / "two_faces.jpg"
        if "obama" in by_name and two.is_file():
            by_name["obama"].uploads.append(Upload(two, "deliberately bad upload: a group photo (several faces)"))
        if "biden" in by_name:
            src = by_name["biden"].uploads[0].path
            truncated = uploads_dir / f"{src.stem}_truncated.jpg"
            data = src.read_bytes()
            truncated.write_bytes(data[: len(data) // 3])
            by_name["biden"].uploads.append(Upload(truncated, "deliberately bad upload: a copy of a real photo cut "
                                                              "to a third of its bytes (corrupt)"))
        host = next((p for p in people if p.name.startswith("sitter-")), None) or people[-1]
        host.uploads.append(Upload(coffee, f"deliberately bad upload: no face ({COFFEE_PROVENANCE})"))

    limited = [p for p in people if p.name.startswith("sitter-")]
    if len(limited) >= 2:
        limited[-1].purposes = TRAINING_ONLY
        limited[-1].consent_note = "consented to training only (no render): their renders must be refused"

    if settings.revoke is not None:
        if settings.revoke not in by_name:
            raise DemoError(f"--revoke {settings.revoke!r}: no such person; the people are {', '.join(by_name)}")
        revoke = settings.revoke
    else:
        second = [p for p in people if p.site == sites[1] and "render" in p.purposes]
        revoke = (second or [p for p in people if "render" in p.purposes])[0].name

    staffed = [s for s in sites if any(p.site == s for p in people)]
    if len(staffed) < 2:
        raise DemoError("the demo needs people at two sites at least: pass --photos DIR, or place the shared photo set "
                        "at ../shared/data (or set MEGAPORTRAIT_DATA)")
    for s in sites:
        if s not in staffed:
            notes.append(f"{s} holds nobody (not enough photos to go round) and sits out the federation")
    if data_dir is None:
        notes.append("the shared photo set was not found: sites hold only the astronaut and the --photos people")
    return Roster(sites=sites, people=people, templates=templates, revoke=revoke, data_dir=data_dir, notes=notes)
