"""Face detection, mesh, masks, identity embedding and skin tone on real photos."""
from __future__ import annotations

import numpy as np
import pytest

from megaportrait.shared.config import FaceSettings
from megaportrait.shared.errors import ModelNotFound
from megaportrait.shared.face_analysis import SFACE_THRESHOLD, FaceAnalyzer, cheek_nose_mask, cosine, face_oval_mask, skin_mask
from megaportrait.shared.imaging import load_image
from megaportrait.shared.records import SourceImage
from megaportrait.shared.skin_tone import face_ita, ita_band


@pytest.fixture(scope="module")
def analyzer():
    return FaceAnalyzer()


def test_astronaut_face_mesh_and_masks(analyzer, astronaut):
    faces = analyzer.analyze(SourceImage.from_array(astronaut))
    assert len(faces) == 1
    f = faces[0]
    x, y, w, h = f.box
    assert 150 < x + w / 2 < 260 and 60 < y + h / 2 < 180  # Eileen Collins' face, upper middle of the frame
    assert f.mesh is not None and f.mesh.shape == (478, 3)
    # Mesh and 5-point landmarks agree on where the nose tip is (mesh index 1 is the nose tip).
    assert np.linalg.norm(f.mesh[1, :2] - f.landmarks5[2]) < 0.15 * w
    oval, skin, cheeks = (m(f, astronaut.shape[:2]) for m in (face_oval_mask, skin_mask, cheek_nose_mask))
    assert oval.sum() > skin.sum() > cheeks.sum() > 0
    assert not (cheeks & ~oval).any(), "skin-tone sample must lie inside the face"
    assert f.embedding.shape == (128,) and abs(np.linalg.norm(f.embedding) - 1) < 1e-4


def test_identity_embedding_separates_people(analyzer, people):
    emb = {p: [analyzer.analyze(load_image(f), mesh=False, largest_only=True)[0].embedding for f in files]
           for p, files in people.items()}
    genuine = [cosine(a, b) for p in emb for i, a in enumerate(emb[p]) for b in emb[p][i + 1:]]
    impostor = [cosine(a, b) for a in emb["obama"] for b in emb["biden"]]
    assert min(genuine) > SFACE_THRESHOLD > max(impostor)
    assert np.mean(genuine) > 0.6 and np.mean(impostor) < 0.3


def test_several_faces_are_all_found(analyzer, shared_data):
    assert len(analyzer.detect(load_image(shared_data / "hard" / "two_faces.jpg"))) == 2
    assert len(analyzer.detect(load_image(shared_data / "hard" / "three_faces.jpg"))) == 3


def test_ita_follows_skin_lightness(analyzer, astronaut):
    f = analyzer.analyze(SourceImage.from_array(astronaut), embed=False)[0]
    ita = face_ita(astronaut, f)
    darker = (astronaut.astype(np.float32) * 0.55).astype(np.uint8)
    assert face_ita(darker, f) < ita - 15
    assert ita_band(70) == "very light" and ita_band(-45) == "dark"


def test_missing_model_dir_names_the_path(tmp_path, astronaut):
    with pytest.raises(ModelNotFound) as err:
        FaceAnalyzer(model_dir=tmp_path).detect(astronaut)
    assert str(tmp_path) in str(err.value)


def test_missing_insightface_pack_names_the_path(tmp_path, astronaut):
    with pytest.raises(ModelNotFound) as err:
        FaceAnalyzer(FaceSettings(insightface_root=tmp_path)).detect(astronaut)
    assert "buffalo_l" in str(err.value) and str(tmp_path) in str(err.value)
