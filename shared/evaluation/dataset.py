"""The evaluation's input: a folder of `person/photo.jpg` and a folder of template portraits, checked once.

People's photos go through the site's own intake (`client.faces.intake_photos`), so the evaluation sees exactly
the crops a real payload would carry; refused photos are kept with their reason. Templates are analysed as the render
node analyses them (largest face, mesh, embedding). Skin tone is the ITA of the central cheek/nose skin
(`shared.skin_tone`): per template from its face, per person as the median over their accepted photos.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megaportrait.client.faces import AcceptedPhoto, intake_photos
from megaportrait.shared.config import FaceSettings
from megaportrait.shared.errors import MegaPortraitError, PhotoRejected
from megaportrait.shared.face_analysis import FaceAnalyzer, mean_embedding
from megaportrait.shared.imaging import load_image
from megaportrait.shared.logs import short_hash
from megaportrait.shared.records import FaceCropSet, FaceRecord, SourceImage
from megaportrait.shared.skin_tone import face_ita, ita_band

log = logging.getLogger("megaportrait.evaluation")

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class EvaluationError(MegaPortraitError):
    """The evaluation cannot run on what it was given; the message says what to add or change."""

    reason = "evaluation"


@dataclass(frozen=True)
class EvalFolders:
    """people: name -> photo paths (sorted); templates: template paths (sorted)."""

    people: dict[str, tuple[Path, ...]]
    templates: tuple[Path, ...]


@dataclass
class Person:
    """One person's accepted photos (input order), refusals, and skin tone.

    name: the folder name (the operator's own label; logs use `ref` instead).
    """

    name: str
    ref: str
    accepted: list[AcceptedPhoto]
    photo_names: list[str]  # file name of each accepted photo, same order
    rejected: list[PhotoRejected]
    ita: float | None
    band: str | None

    def embeddings(self) -> list[np.ndarray]:
        return [a.face.embedding for a in self.accepted]

    def held_out(self, index: int) -> list[np.ndarray]:
        """Embeddings of every accepted photo but `index`: the reference a render of photo `index` is judged by."""
        return [a.face.embedding for i, a in enumerate(self.accepted) if i != index]

    def payload(self, index: int) -> FaceCropSet:
        """The classic payload carrying only photo `index` (so that the other photos stay held out)."""
        a = self.accepted[index]
        return FaceCropSet(person_ref=self.ref, crops=(a.crop,), mean_embedding=mean_embedding([a.face.embedding]),
                           embedder=a.face.embedder)


@dataclass
class Template:
    """A template portrait with its analysed face (mesh and embedding) and skin tone."""

    name: str
    image: SourceImage
    face: FaceRecord
    ita: float
    band: str


@dataclass
class EvalData:
    """People with at least two accepted photos, analysed templates, and what was left out and why."""

    people: list[Person]
    templates: list[Template]
    skipped: list[dict] = field(default_factory=list)  # {"what", "name", "reason"}
    embedder: str = ""


def find_folders(people_dir: Path, templates_dir: Path) -> EvalFolders:
    """People (sub-folders of `people_dir` holding photos) and templates (photos in `templates_dir`)."""
    people_dir, templates_dir = Path(people_dir), Path(templates_dir)
    for what, d in (("people", people_dir), ("templates", templates_dir)):
        if not d.is_dir():
            raise EvaluationError(f"{what} folder {d} does not exist; pass --{what} DIR")
    people = {}
    for sub in sorted(p for p in people_dir.iterdir() if p.is_dir()):
        photos = tuple(sorted(p for p in sub.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES))
        if photos:
            people[sub.name] = photos
    templates = tuple(sorted(p for p in templates_dir.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES))
    if len(people) < 2:
        raise EvaluationError(f"{people_dir} holds {len(people)} person folder(s) with photos; the evaluation needs at "
                              "least 2 (people/<name>/*.jpg): impostor pairs need a second person")
    if not templates:
        raise EvaluationError(f"{templates_dir} holds no template photos ({', '.join(PHOTO_SUFFIXES)})")
    return EvalFolders(people=people, templates=templates)


def prepare_person(name: str, photos: tuple[Path, ...], analyzer: FaceAnalyzer, settings: FaceSettings) -> Person:
    """Intake of one person's photos, and their skin tone (median ITA over accepted photos)."""
    report = intake_photos(photos, settings, analyzer, show_progress=False)
    names = []
    for a in report.accepted:
        names.append(Path(a.origin).name)
    itas = []
    for a in report.accepted:
        if a.crop.face.mesh is not None:
            try:
                itas.append(face_ita(a.crop.pixels, a.crop.face))
            except ValueError:
                pass
    ita = float(np.median(itas)) if itas else None
    return Person(name=name, ref=short_hash(name), accepted=list(report.accepted), photo_names=names,
                  rejected=list(report.rejected), ita=ita, band=ita_band(ita) if ita is not None else None)


def prepare_template(path: Path, analyzer: FaceAnalyzer) -> Template:
    """Load and analyse a template; raises EvaluationError when it has no usable face."""
    image = load_image(path)
    faces = analyzer.analyze(image, largest_only=True)
    if not faces:
        raise EvaluationError(f"template {path.name}: no face found", reason="template_no_face")
    face = faces[0]
    if face.mesh is None:
        raise EvaluationError(f"template {path.name}: the face mesh did not fit, skin tone cannot be measured",
                              reason="template_no_mesh")
    ita = face_ita(image.pixels, face)
    return Template(name=path.stem, image=image, face=face, ita=ita, band=ita_band(ita))


def prepare_data(folders: EvalFolders, analyzer: FaceAnalyzer, settings: FaceSettings | None = None,
                 *, max_templates: int | None = None, progress=None) -> EvalData:
    """Check every person's photos and analyse the templates (the first `max_templates`, spread over skin-tone
    bands, when set). `progress`: optional callable advanced once per folder item."""
    settings = settings or FaceSettings()
    data = EvalData(people=[], templates=[], embedder=analyzer.embedder)
    for name, photos in folders.people.items():
        person = prepare_person(name, photos, analyzer, settings)
        for r in person.rejected:
            data.skipped.append({"what": "photo", "name": f"{name}/{Path(r.origin).name}", "reason": r.reason,
                                 "detail": r.detail})
        if len(person.accepted) < 2:
            data.skipped.append({"what": "person", "name": name, "reason": "too_few_photos",
                                 "detail": f"{len(person.accepted)} accepted photo(s); need 2 (one pasted, one held out)"})
            log.warning("person %s left out: %d accepted photo(s)", person.ref, len(person.accepted))
        else:
            data.people.append(person)
        if progress:
            progress(len(photos))
    templates = []
    for path in folders.templates:
        try:
            templates.append(prepare_template(path, analyzer))
        except (EvaluationError, PhotoRejected) as exc:
            data.skipped.append({"what": "template", "name": path.name, "reason": exc.reason, "detail": str(exc)})
        if progress:
            progress(1)
    data.templates = spread_over_bands(templates, max_templates)
    if len(data.people) < 2:
        raise EvaluationError(f"only {len(data.people)} person(s) have 2 or more usable photos; need at least 2 people")
    if not data.templates:
        raise EvaluationError("no template has a usable face")
    return data


def spread_over_bands(templates: list[Template], limit: int | None) -> list[Template]:
    """Up to `limit` templates taken round-robin over skin-tone bands (lightest band first), so a subset still
    covers every band it can; all of them (sorted by ITA, descending) when `limit` is None."""
    ordered = sorted(templates, key=lambda t: -t.ita)
    if limit is None or limit >= len(ordered):
        return ordered
    by_band: dict[str, list[Template]] = {}
    for t in ordered:
        by_band.setdefault(t.band, []).append(t)
    picked: list[Template] = []
    while len(picked) < limit:
        for band in list(by_band):
            if by_band[band] and len(picked) < limit:
                picked.append(by_band[band].pop(0))
    return sorted(picked, key=lambda t: -t.ita)


def default_data_dirs(repo_root: Path | None = None) -> tuple[Path, Path] | None:
    """(people, templates) under ../shared/data relative to the repository, when that folder exists."""
    root = repo_root or Path(__file__).resolve().parents[2]
    data = root.parent / "shared" / "data"
    if (data / "people").is_dir() and (data / "templates").is_dir():
        return data / "people", data / "templates"
    return None
