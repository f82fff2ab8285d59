"""Real sarcoma CT that the shipped segmentation model never trained on (test helpers).

The validation patients of ``models/segmentation`` (every 5th case of
``../shared/data/sts_cohort/cohort.csv``) are the CT that tests send through the node when they
need the real model to find a real tumour: JPEG-LS as the PACS stores them, with the
clinician's GTV as the truth.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

COHORT = Path(__file__).resolve().parents[2] / "shared" / "data" / "sts_cohort"
#: Never trained on (the shipped model's validation patients).
HELD_OUT = ("STS_006", "STS_011", "STS_016", "STS_021", "STS_026", "STS_031", "STS_036")


def require_cohort() -> Path:
    if not COHORT.is_dir():
        pytest.skip(f"the sarcoma cohort is not at {COHORT}")
    return COHORT


def held_out_series(case_id: str, folder: Path, *, uid_seed: str | None = None,
                    edit: Callable[[Dataset], None] | None = None,
                    decompress: bool = False) -> list[Path]:
    """Copies of a held-out patient's CT files in ``folder``.

    ``uid_seed`` gives the copy its own Study, Series and SOP Instance UIDs (a new study for
    the PACS); ``edit`` changes each data set before it is written; ``decompress`` writes the
    pixels as Explicit VR Little Endian (values unchanged: JPEG-LS is lossless here), for
    senders that propose only uncompressed syntaxes. Otherwise pixel data is untouched.
    """
    assert case_id in HELD_OUT, f"{case_id} was trained on"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for path in sorted((require_cohort() / case_id / "CT" / "image").iterdir()):
        ds = pydicom.dcmread(path)
        if uid_seed is not None:
            ds.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[uid_seed, "study"])
            ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[uid_seed, "series"])
            ds.SOPInstanceUID = pydicom.uid.generate_uid(
                entropy_srcs=[uid_seed, str(ds.SOPInstanceUID)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if decompress:
            ds.decompress()
        if edit is not None:
            edit(ds)
        ds.save_as(folder / path.name, enforce_file_format=True)
        paths.append(folder / path.name)
    return paths


def gtv(case_id: str) -> tuple[np.ndarray, list[str]]:
    """The clinician's GTV on the CT grid, and the SOP Instance UIDs of its slices in order."""
    from dicomnode.assemble import assemble
    from dicomnode.masks import ImageGrid, rtstruct_mask

    folder = require_cohort() / case_id / "CT"
    volume = assemble([pydicom.dcmread(p) for p in sorted((folder / "image").iterdir())])
    mask = rtstruct_mask(pydicom.dcmread(folder / "rtstruct" / "RS.dcm"),
                         ImageGrid(volume.hu, volume.geometry, volume.frame_of_reference_uid),
                         "GTV_Mass_CT", case_id)
    return mask, [str(ds.SOPInstanceUID) for ds in volume.sources]
