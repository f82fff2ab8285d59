"""The SQLite index of the spool: counters, pending series, reprocessing (dicomnode.spool.index)."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from dicomnode.spool.index import Index, InstanceRecord
from dicomnode.types import SeriesKey

CT = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
KEY = SeriesKey("1.2.3", "1.2.3.4")
AXIAL = "1.000000,0.000000,0.000000,0.000000,1.000000,0.000000"


def record(
    n: int, key: SeriesKey = KEY, *, at: float = 1000.0, **changes: object
) -> InstanceRecord:
    values: dict[str, object] = {
        "sop_instance_uid": f"{key.series_uid}.{n}",
        "key": key,
        "sop_class_uid": CT,
        "transfer_syntax": "1.2.840.10008.1.2.1",
        "path": Path(f"/spool/{key.study_uid}/{key.series_uid}/{n}.dcm"),
        "received_at": at + n,
        "calling_ae": "PACS",
        "association_id": "a1",
        "routable": True,
        "modality": "CT",
        "position_along_normal": -100.0 + 2.5 * n,
        "orientation": AXIAL,
        "instance_number": n + 1,
        "rows": 512,
        "cols": 512,
    }
    values.update(changes)
    return InstanceRecord(**values)  # type: ignore[arg-type]


@pytest.fixture
def index(tmp_path: Path) -> Index:
    idx = Index(tmp_path / "index.sqlite")
    yield idx
    idx.close()


def test_counters_arrivals_and_positions(index: Index) -> None:
    for n in (3, 0, 2, 1):  # out of order
        index.record_instance(record(n))
    state = index.series_state(KEY)
    assert state.instance_count == 4 and state.processed_count == 0
    assert state.first_arrival == 1003.0 and state.last_arrival == 1003.0
    assert state.positions == (-100.0, -97.5, -95.0, -92.5)
    assert state.orientation_consistent and not state.multiframe and state.routable


def test_duplicate_does_not_count_but_moves_last_arrival(index: Index) -> None:
    index.record_instance(record(0))
    index.record_instance(record(0, at=2000.0))
    state = index.series_state(KEY)
    assert state.instance_count == 1
    assert state.last_arrival == 2000.0


def test_replacement_is_counted_without_adding_an_instance(index: Index) -> None:
    index.record_instance(record(0))
    index.record_instance(record(0, replaced=True))
    state = index.series_state(KEY)
    assert state.instance_count == 1 and state.replaced_count == 1


def test_pending_series_lists_routable_series_with_new_instances(index: Index) -> None:
    other = SeriesKey("1.2.3", "1.2.3.5")
    structures = SeriesKey("1.2.3", "1.2.3.6")
    for n in range(3):
        index.record_instance(record(n))
    index.record_instance(record(0, other, at=500.0))
    index.record_instance(record(0, structures, routable=False, sop_class_uid=RTSTRUCT))
    assert [s.key for s in index.pending_series()] == [other, KEY]  # oldest activity first


def test_mark_taken_then_new_instance_makes_the_series_pending_again(index: Index) -> None:
    for n in range(3):
        index.record_instance(record(n))
    index.mark_taken(KEY, 3)
    assert index.pending_series() == []
    index.record_instance(record(1, at=5000.0))  # a resent duplicate: no reprocessing
    assert index.pending_series() == []
    index.record_instance(record(3, at=5000.0))  # a genuinely new instance
    (state,) = index.pending_series()
    assert state.instance_count == 4 and state.processed_count == 3 and state.new_instances == 1
    assert len(index.instance_paths(KEY)) == 4  # the next job covers the whole series


def test_instances_arriving_while_a_job_is_created_stay_pending(index: Index) -> None:
    for n in range(3):
        index.record_instance(record(n))
    paths = index.instance_paths(KEY)
    index.record_instance(record(3))  # arrives between the snapshot and mark_taken
    index.mark_taken(KEY, len(paths))
    assert [s.new_instances for s in index.pending_series()] == [1]


def test_mark_taken_of_an_unknown_series_raises(index: Index) -> None:
    with pytest.raises(KeyError):
        index.mark_taken(SeriesKey("9", "9.9"), 1)
    with pytest.raises(KeyError):
        index.series_state(SeriesKey("9", "9.9"))


def test_instance_paths_follow_the_slice_normal_and_skip_non_routable(index: Index) -> None:
    index.record_instance(record(2))
    index.record_instance(record(0))
    index.record_instance(record(5, position_along_normal=None, orientation=None))
    index.record_instance(record(1))
    index.record_instance(record(9, routable=False, sop_class_uid=RTSTRUCT))
    assert [p.name for p in index.instance_paths(KEY)] == ["0.dcm", "1.dcm", "2.dcm", "5.dcm"]


def test_orientation_and_multiframe_flags(index: Index) -> None:
    index.record_instance(record(0))
    index.record_instance(
        record(1, orientation="1.000000,0.000000,0.000000,0.000000,1.000010,0.000000")
    )
    assert index.series_state(KEY).orientation_consistent  # within tolerance
    index.record_instance(
        record(2, orientation="1.000000,0.000000,0.000000,0.000000,0.990000,0.141000")
    )
    assert not index.series_state(KEY).orientation_consistent
    enhanced = SeriesKey("1.2.3", "1.2.3.7")
    index.record_instance(record(0, enhanced, frames=120, position_along_normal=None))
    state = index.series_state(enhanced)
    assert state.multiframe and state.positions == ()


def test_instance_that_moves_to_another_series_leaves_the_old_count(index: Index) -> None:
    index.record_instance(record(0))
    moved = replace(record(0), key=SeriesKey("1.2.3", "1.2.3.8"))
    index.record_instance(moved)
    assert index.series_state(KEY).instance_count == 0
    assert index.series_state(moved.key).instance_count == 1


def test_concurrent_associations_are_counted_exactly(index: Index) -> None:
    keys = [SeriesKey("1.2.3", f"1.2.3.{10 + t}") for t in range(4)]

    def receive(key: SeriesKey) -> None:
        for n in range(50):
            index.record_instance(record(n, key))

    threads = [threading.Thread(target=receive, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(s.instance_count for s in index.pending_series()) == [50, 50, 50, 50]


def test_durable_configuration_and_persistence(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    index.record_instance(record(0))
    index.close()
    with sqlite3.connect(tmp_path / "index.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    reopened = Index(tmp_path / "index.sqlite")
    assert reopened._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    assert reopened.series_state(KEY).instance_count == 1
    reopened.close()


# -- start-up reconciliation: spooled files that the index does not know -----------------------


def spool_study(root: Path, n_slices: int = 4) -> list[Path]:
    """A phantom series in the spool's layout, ``<study>/<series>/<sop>.dcm``."""
    from dicomnode.phantom import make_phantom_study

    phantom = make_phantom_study(32011, shape=(n_slices, 16, 16), n_lesions=0)
    paths = []
    for ds in phantom.datasets:
        path = root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def listener_record(path: Path, at: float) -> InstanceRecord:
    """What the listener records for a spooled slice of :func:`spool_study` (axial)."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return InstanceRecord(
        sop_instance_uid=ds.SOPInstanceUID,
        key=SeriesKey(ds.StudyInstanceUID, ds.SeriesInstanceUID),
        sop_class_uid=CT, transfer_syntax=ds.file_meta.TransferSyntaxUID, path=path,
        received_at=at, calling_ae="PACS", association_id="a1", routable=True, modality="CT",
        position_along_normal=float(ds.ImagePositionPatient[2]), orientation=AXIAL,
        instance_number=int(ds.InstanceNumber), rows=ds.Rows, cols=ds.Columns,
    )


def test_spooled_files_without_a_row_are_indexed_as_if_just_received(
        index: Index, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "spool"
    paths = spool_study(root)
    index.record_instance(listener_record(paths[0], at=1000.0))  # acknowledged and indexed
    (paths[0].parent / f".{paths[1].stem}.abc.tmp").write_bytes(b"partial")  # a temporary
    assert index.index_orphans(root, (CT,), now=5000.0) == 3
    assert "indexed 3 spooled instance(s)" in caplog.text
    (state,) = index.pending_series()
    assert state.instance_count == 4 and state.last_arrival == 5000.0  # quiet period from now
    assert index.instance_paths(state.key) == paths  # ordered along the normal, as received
    expected = [listener_record(p, 0.0) for p in paths]
    assert state.positions == tuple(sorted(r.position_along_normal for r in expected))
    with sqlite3.connect(index.db_path) as db:
        rows = db.execute("SELECT sop_instance_uid, calling_ae, association_id, rows, cols, "
                          "instance_number, orientation FROM instances "
                          "WHERE association_id = 'reconciled' ORDER BY instance_number").fetchall()
    assert rows == [(r.sop_instance_uid, "", "reconciled", r.rows, r.cols, r.instance_number,
                     AXIAL) for r in expected[1:]]
    assert index.index_orphans(root, (CT,), now=6000.0) == 0  # nothing twice


def test_reconciliation_skips_replaced_copies_and_unreadable_files(
        index: Index, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "spool"
    first, second = spool_study(root, n_slices=2)
    moved = tmp_path / "elsewhere" / first.name  # the index holds this instance at another path
    index.record_instance(replace(listener_record(first, 1000.0), path=moved))
    (second.parent / "1.2.3.4.5.dcm").write_bytes(b"not DICOM at all")
    assert index.index_orphans(root, (CT,), now=5000.0) == 1  # only ``second``
    assert "1.2.3.4.5.dcm is not indexed: its header cannot be read" in caplog.text
    assert (second.parent / "1.2.3.4.5.dcm").exists()  # left for a person to look at


def test_orphans_of_other_sop_classes_are_indexed_but_not_routable(
        index: Index, tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool_study(root, n_slices=2)
    assert index.index_orphans(root, (RTSTRUCT,), now=5000.0) == 2
    assert index.pending_series() == []
