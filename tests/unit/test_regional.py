"""Wu et al.'s regional-variation features and our shape descriptors, on hand-built phantoms.

Expected histograms come from brute-force pixel distances computed here (not from the
extractor's distance transforms), expected metric values from closed forms worked out by hand
for delta-shaped histograms (see :func:`delta_versus`).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from dicomnode.analyse.regional import (
    RegionalExtractor,
    histogram_metrics,
    lesion_regions,
    regional_feature_names,
)
from dicomnode.config import RegionalConfig, from_mapping
from dicomnode.errors import ConfigError, InputRejected
from dicomnode.types import Geometry, LabelVolume, Lesion, SeriesKey, Volume

SPACING = (2.0, 0.8, 0.8)
BINS, HU_MIN, BIN_WIDTH = 100, -1000.0, 15.0
CORE_HU, RIM_HU, RING_HU = 60.0, 20.0, -700.0  # bins 70, 68 and 20


@pytest.fixture(scope="module")
def extractor() -> RegionalExtractor:
    return RegionalExtractor(RegionalConfig())


def extractor_with(**changes) -> RegionalExtractor:
    return RegionalExtractor(RegionalConfig(**changes))


# ----------------------------------------------------------------------------- phantoms
def disk(shape_yx, centre_yx, radius_px) -> np.ndarray:
    y, x = np.ogrid[: shape_yx[0], : shape_yx[1]]
    return (y - centre_yx[0]) ** 2 + (x - centre_yx[1]) ** 2 <= radius_px**2


def stacked_disks(radii_px, shape_yx=(48, 48), centre_yx=(24, 24)) -> np.ndarray:
    """A lesion whose slices are disks of the given radii (0: no lesion), one empty slice around."""
    slices = [np.zeros(shape_yx, bool)]
    slices += [disk(shape_yx, centre_yx, r) if r else np.zeros(shape_yx, bool) for r in radii_px]
    slices += [np.zeros(shape_yx, bool)]
    return np.stack(slices)


def brute_distances_mm(
    query: np.ndarray, targets: np.ndarray, spacing_yx=SPACING[1:]
) -> np.ndarray:
    """Per ``query`` pixel of a 2D slice, the distance (mm) to the nearest pixel of ``targets``
    (infinite at the other pixels)."""
    asked = np.argwhere(query) * spacing_yx
    points = np.argwhere(targets) * spacing_yx
    distances = np.full(query.shape, np.inf)
    distances[query] = np.sqrt(((asked[:, None, :] - points[None, :, :]) ** 2).sum(axis=2)).min(
        axis=1
    )
    return distances


def hand_regions(
    lesion: np.ndarray, width_mm: float, spacing_yx=SPACING[1:]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Core, rim and peritumoral ring by the paper's per-slice definitions, brute force."""
    core = np.zeros_like(lesion)
    ring = np.zeros_like(lesion)
    for z in range(lesion.shape[0]):
        if not lesion[z].any():
            continue
        depth = brute_distances_mm(lesion[z], ~lesion[z], spacing_yx)
        core[z] = lesion[z] & (depth > depth[lesion[z]].max() / 2)
        ring[z] = brute_distances_mm(~lesion[z], lesion[z], spacing_yx) <= width_mm
    return core, lesion & ~core, ring


def two_level_lesion_phantom(
    radii_px=(3, 7, 9, 6),
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """A lesion with core 60 HU and rim 20 HU in a -700 HU organ; region counts by hand."""
    lesion = stacked_disks(radii_px)
    core, rim, _ = hand_regions(lesion, 5.0)
    hu = np.full(lesion.shape, RING_HU)
    hu[core], hu[rim] = CORE_HU, RIM_HU
    counts = {"core": int(core.sum()), "rim": int(rim.sum())}
    for width in (5.0, 10.0):
        counts[f"ring{width:g}"] = int(hand_regions(lesion, width)[2].sum())
    return hu, lesion, counts


def delta_versus(share: float, others: list[float]) -> tuple[float, float, float, float]:
    """Metrics of a one-bin histogram H1 against H2 holding ``share`` in that bin and the
    ``others`` shares in other bins (worked out by hand from the definitions with N = 100 bins:
    bar H = 1/100; sum (H1 - bar H1)(H2 - bar H2) = share - 1/100; sum (H1 - bar H1)^2 = 0.99;
    sum (H2 - bar H2)^2 = sum H2^2 - 1/100)."""
    squares = share**2 + sum(o**2 for o in others)
    correlation = (share - 0.01) / math.sqrt(0.99 * (squares - 0.01))
    return correlation, (1 - share) ** 2, share, math.sqrt(1 - math.sqrt(share))


DISJOINT = delta_versus(0.0, [1.0])  # (-1/99, 1, 0, 1)
IDENTICAL = (1.0, 0.0, 1.0, 0.0)


def metrics_of(features, prefix: str) -> tuple[float, ...]:
    values = features.as_dict()
    return tuple(
        values[f"{prefix}_{m}"]
        for m in ("correlation", "chisquare", "intersection", "bhattacharyya")
    )


# ----------------------------------------------------------------------------- metrics
def test_histogram_metrics_at_the_extremes():
    h = np.zeros(BINS)
    h[[3, 40]] = [0.25, 0.75]
    assert histogram_metrics(h, h) == pytest.approx(IDENTICAL, abs=1e-12)
    one, other = np.zeros(BINS), np.zeros(BINS)
    one[10], other[90] = 1.0, 1.0
    assert DISJOINT == pytest.approx((-1 / 99, 1.0, 0.0, 1.0))
    assert histogram_metrics(one, other) == pytest.approx(DISJOINT, abs=1e-12)


def test_chisquare_is_asymmetric_and_divides_by_the_first_histogram():
    h1, h2 = np.zeros(BINS), np.zeros(BINS)
    h1[[0, 1]] = [0.5, 0.5]
    h2[[1, 2]] = [0.5, 0.5]
    # bins where h1 > 0: (0.5 - 0)^2 / 0.5 + (0.5 - 0.5)^2 / 0.5 = 0.5; bin 2 is skipped
    assert histogram_metrics(h1, h2)[1] == pytest.approx(0.5)
    assert histogram_metrics(h1, h2 * 0 + h1 * 0.5 + h2 * 0.5)[1] == pytest.approx(0.125)


# ----------------------------------------------------------------------------- regions
@pytest.mark.parametrize("ring_includes_lesion", [False, True])
def test_phantom_features_match_hand_computed_histograms(ring_includes_lesion):
    hu, lesion, n = two_level_lesion_phantom()
    everywhere = np.ones(lesion.shape, bool)
    features = extractor_with(ring_includes_lesion=ring_includes_lesion).extract_arrays(
        hu, lesion.astype(np.uint8), SPACING, organ_mask=everywhere
    )
    assert features.warnings == ()
    assert n["core"] > 0 and n["rim"] > 0 and n["ring10"] > n["ring5"] > 0
    assert metrics_of(features, "wu_core_rim") == pytest.approx(DISJOINT, abs=1e-9)
    for width in (5, 10):
        ring = n[f"ring{width}"]
        if ring_includes_lesion:
            # ring histogram: core, rim and ring pixels in three different bins
            total = n["core"] + n["rim"] + ring
            shares = {"core": n["core"] / total, "rim": n["rim"] / total, "ring": ring / total}
            for region in ("rim", "core"):
                others = [s for r, s in shares.items() if r != region]
                expected = delta_versus(shares[region], others)
                got = metrics_of(features, f"wu_ring{width}_{region}_ring")
                assert got == pytest.approx(expected, abs=1e-9), (width, region)
        else:
            for region in ("rim", "core"):
                got = metrics_of(features, f"wu_ring{width}_{region}_ring")
                assert got == pytest.approx(DISJOINT, abs=1e-9), (width, region)


def test_regions_match_brute_force_per_slice():
    lesion = stacked_disks((2, 5, 8, 4, 0))
    # A 4 x 8 pixel slice: depths 1 and 2 pixels, so half the largest depth is a tie that
    # must go to the rim; with 1 mm pixels the ring edges fall on exact pixel distances too.
    lesion[-2, 20:24, 20:28] = True
    regions = lesion_regions(
        lesion, np.ones_like(lesion), (1.0, 1.0), (5.0, 10.0), ring_includes_lesion=False
    )
    assert regions.rim[-2].sum() == 4 * 8 - 2 * 6
    for index, width in enumerate((5.0, 10.0)):
        core, rim, ring = hand_regions(lesion, width, spacing_yx=(1.0, 1.0))
        np.testing.assert_array_equal(regions.core, core)
        np.testing.assert_array_equal(regions.rim, rim)
        np.testing.assert_array_equal(regions.rings[index], ring)
    # rings stay on the lesion's slices (the paper's per-slice definition)
    assert not regions.rings[1][0].any() and not regions.rings[1][-1].any()


def test_identical_core_and_rim_histograms():
    lesion = stacked_disks((6, 8, 6))
    hu = np.where(lesion, 40.0, RING_HU)
    features = extractor_with().extract_arrays(hu, lesion, SPACING, organ_mask=np.ones_like(lesion))
    assert metrics_of(features, "wu_core_rim") == pytest.approx(IDENTICAL, abs=1e-12)


def test_ring_is_restricted_to_the_organ_mask():
    # Left of the lesion: organ at -700 HU; right: other tissue at 30 HU, which falls in the
    # rim's bin (20 HU): any such pixel in the ring would make the rim-ring intersection > 0.
    hu, lesion, _ = two_level_lesion_phantom()
    columns = np.arange(lesion.shape[2])
    organ = np.broadcast_to(columns < 24, lesion.shape)
    hu = np.where(~organ & ~lesion, 30.0, hu)
    extractor = extractor_with(ring_includes_lesion=False)
    within_organ = extractor.extract_arrays(hu, lesion, SPACING, organ_mask=organ)
    assert metrics_of(within_organ, "wu_ring10_rim_ring") == pytest.approx(DISJOINT, abs=1e-9)
    everywhere = extractor.extract_arrays(hu, lesion, SPACING, organ_mask=np.ones_like(lesion))
    assert everywhere.as_dict()["wu_ring10_rim_ring_intersection"] > 0.3


def body_phantom(lesion_centre_yx) -> tuple[np.ndarray, np.ndarray]:
    """Air around a 30 HU body disk (radius 24 px) and a 100 HU lesion (radius 5 px)."""
    shape = (5, 64, 64)
    body = np.broadcast_to(disk(shape[1:], (32, 32), 24), shape)
    lesion = stacked_disks((4, 5, 4), shape_yx=shape[1:], centre_yx=lesion_centre_yx)
    hu = np.where(body, 30.0, -1000.0)
    hu[lesion] = 100.0
    return hu, lesion


def test_without_organ_mask_the_ring_is_restricted_to_the_body():
    hu, lesion = body_phantom(lesion_centre_yx=(32, 52))  # the 10 mm ring reaches the air
    assert (hand_regions(lesion, 10.0)[2] & (hu == -1000.0)).any()
    features = extractor_with(ring_includes_lesion=False).extract_arrays(hu, lesion, SPACING)
    assert features.warnings == ()
    # lesion (bin 73) against a ring of body only (bin 68): disjoint deltas, so no air (bin 0)
    # came into the ring; with air in it the correlation would differ from -1/99.
    assert metrics_of(features, "wu_ring10_core_ring") == pytest.approx(DISJOINT, abs=1e-9)
    assert metrics_of(features, "wu_ring10_rim_ring") == pytest.approx(DISJOINT, abs=1e-9)


def test_a_nodule_in_the_lung_has_its_ring_in_the_body():
    # Lung (-850 HU, below the body threshold) inside a 30 HU chest wall: the lung is a hole
    # of the body on every slice, filled, so the ring around a nodule within it is body.
    hu, lesion = body_phantom(lesion_centre_yx=(32, 32))
    lung = np.broadcast_to(disk((64, 64), (32, 32), 18), hu.shape)
    hu = np.where(lung & ~lesion, -850.0, hu)
    features = extractor_with(ring_includes_lesion=False).extract_arrays(hu, lesion, SPACING)
    assert features.warnings == ()
    assert metrics_of(features, "wu_ring10_rim_ring") == pytest.approx(DISJOINT, abs=1e-9)


def test_a_ring_outside_the_body_gives_nan_and_a_warning():
    hu, lesion = body_phantom(lesion_centre_yx=(32, 32))
    hu = np.where(hu == 30.0, -1000.0, hu)
    hu[:, 2:10, 2:30] = 30.0  # the body, now elsewhere: the lesion floats in air
    features = extractor_with().extract_arrays(hu, lesion, SPACING)
    values = features.as_dict()
    ring_names = [k for k in values if k.startswith("wu_ring")]
    assert ring_names and all(math.isnan(values[k]) for k in ring_names)
    assert all(math.isfinite(values[f"wu_core_rim_{m}"]) for m in ("chisquare", "intersection"))
    assert any("5 mm ring lies in the body" in w for w in features.warnings)
    assert any("10 mm ring lies in the body" in w for w in features.warnings)


def test_a_lesion_too_thin_for_a_rim_gives_nan_and_a_warning(extractor):
    lesion = np.zeros((3, 24, 24), bool)
    lesion[1, 10:12, 10:12] = True  # 2 x 2 pixels: all at the same depth, all core
    hu = np.where(lesion, 40.0, RING_HU)
    features = extractor.extract_arrays(hu, lesion, SPACING, organ_mask=np.ones_like(lesion))
    values = features.as_dict()
    for name, value in values.items():
        if name.startswith(("wu_core_rim", "wu_ring5_rim", "wu_ring10_rim")):
            assert math.isnan(value), name
        elif name.startswith(("wu_ring5_core", "wu_ring10_core")):
            assert math.isfinite(value), name
    assert any("inner rim is empty" in w for w in features.warnings)
    assert math.isfinite(values["wu_shape_volume_ml"])


def test_a_lesion_outside_the_hu_range_gives_nan_and_a_warning(extractor):
    lesion = stacked_disks((5, 7, 5))
    hu = np.where(lesion, 1200.0, RING_HU)  # e.g. metal: above 500 HU
    features = extractor.extract_arrays(hu, lesion, SPACING, organ_mask=np.ones_like(lesion))
    regional = [v for k, v in features.as_dict().items() if not k.startswith("wu_shape")]
    assert all(math.isnan(v) for v in regional)
    assert any("no core voxel lies within -1000..500 HU" in w for w in features.warnings)


def test_an_empty_lesion_is_rejected(extractor):
    with pytest.raises(InputRejected, match="lesion 2: its mask is empty"):
        extractor.extract_arrays(np.zeros((3, 8, 8)), np.ones((3, 8, 8)), SPACING, label=2)


def test_results_do_not_depend_on_where_the_lesion_lies(extractor):
    hu, lesion, _ = two_level_lesion_phantom()
    small = extractor.extract_arrays(hu, lesion, SPACING, organ_mask=np.ones_like(lesion))
    big_hu = np.full((12, 160, 140), RING_HU)
    big_mask = np.zeros(big_hu.shape, np.uint16)
    big_hu[4:10, 70:118, 30:78] = hu
    big_mask[4:10, 70:118, 30:78] = lesion * 3
    moved = extractor.extract_arrays(
        big_hu, big_mask, SPACING, organ_mask=np.ones(big_hu.shape, bool), label=3
    )
    assert moved.label == 3
    np.testing.assert_allclose(moved.as_array(), small.as_array(), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- shape
def ellipsoid(semi_axes_mm, rotation=None, shape=(48, 64, 64), spacing=(1.0, 0.8, 0.8)):
    grid = np.indices(shape).reshape(3, -1).T
    centred = (grid - (np.array(shape) - 1) / 2) * spacing
    if rotation is not None:
        centred = centred @ rotation.as_matrix()
    inside = ((centred / np.asarray(semi_axes_mm)) ** 2).sum(axis=1) <= 1
    return inside.reshape(shape), spacing


def shape_of(extractor, lesion, spacing) -> dict[str, float]:
    hu = np.where(lesion, 40.0, RING_HU)
    features = extractor.extract_arrays(hu, lesion, spacing, organ_mask=np.ones_like(lesion))
    return {k: v for k, v in features.as_dict().items() if k.startswith("wu_shape")}


def energies(shape: dict[str, float]) -> np.ndarray:
    return np.array([v for k, v in shape.items() if "energy" in k])


def test_sphere_has_equal_axes_and_no_energy_beyond_degree_zero(extractor):
    lesion, spacing = ellipsoid((10, 10, 10))
    shape = shape_of(extractor, lesion, spacing)
    axes = [shape[f"wu_shape_axis_{a}"] for a in ("minor", "middle", "major")]
    assert axes == pytest.approx([1.0, 1.0, 1.0], rel=0.02)
    assert energies(shape).max() < 0.03
    assert shape["wu_shape_volume_ml"] == pytest.approx(4 / 3 * math.pi, rel=0.02)


def test_ellipsoid_shows_its_axes_and_even_degree_energy(extractor):
    sphere = shape_of(extractor, *ellipsoid((10, 10, 10)))
    shape = shape_of(extractor, *ellipsoid((6, 10, 16)))
    axes = np.array([shape[f"wu_shape_axis_{a}"] for a in ("minor", "middle", "major")])
    np.testing.assert_allclose(axes / axes[2], [6 / 16, 10 / 16, 1.0], rtol=0.03)
    e = energies(shape)
    assert e[1] > 0.5 and e[1] > 20 * energies(sphere)[1]  # degree 2 carries the elongation
    assert e[1] > e[3] > e[5]  # then degrees 4, 6, ... decay
    assert e[0::2].max() < 0.05 * e[1]  # odd degrees vanish by symmetry


def test_shape_descriptors_do_not_depend_on_orientation(extractor):
    upright = shape_of(extractor, *ellipsoid((6, 10, 16)))
    turned = shape_of(
        extractor, *ellipsoid((6, 10, 16), Rotation.from_euler("zyx", [30, 50, -20], degrees=True))
    )
    np.testing.assert_allclose(energies(turned), energies(upright), atol=0.03)
    for name in ("axis_minor", "axis_middle", "axis_major", "volume_ml", "entropy_l02"):
        key = f"wu_shape_{name}"
        assert turned[key] == pytest.approx(upright[key], rel=0.05), name


# ----------------------------------------------------------------------------- API, config
def test_feature_names_are_fixed_and_prefixed(extractor):
    names = extractor.feature_names
    assert len(names) == len(set(names)) == 20 + 15 + 15 + 3 + 1
    assert all(n.startswith("wu_") for n in names)
    assert names[:2] == ("wu_ring5_rim_ring_correlation", "wu_ring5_rim_ring_chisquare")
    assert "wu_ring10_core_ring_bhattacharyya" in names and "wu_core_rim_intersection" in names
    assert regional_feature_names((7.5,))[1] == "wu_ring7p5_rim_ring_chisquare"
    assert extractor_with(shape_degree=4).feature_names[-4:] == (
        "wu_shape_axis_minor",
        "wu_shape_axis_middle",
        "wu_shape_axis_major",
        "wu_shape_volume_ml",
    )


def test_extract_gives_one_result_per_lesion_in_order(extractor):
    hu, first = body_phantom(lesion_centre_yx=(32, 22))
    second = stacked_disks((3, 4, 3), shape_yx=(64, 64), centre_yx=(32, 44))
    labels = first.astype(np.uint16) * 2 + second.astype(np.uint16)
    hu = np.where(second, 200.0, hu)
    geometry = Geometry((0.0, 0.0, 0.0), (1, 0, 0), (0, 1, 0), (0, 0, 1), SPACING)
    volume = Volume(hu, geometry, SeriesKey("1.2", "1.2.3"), (), "1.2.4")
    lesions = tuple(
        Lesion(label, int((labels == label).sum()), 0.0, (0.0, 0.0, 0.0), ((0, 0),) * 3)
        for label in (2, 1)
    )
    results = extractor.extract(volume, LabelVolume(labels, lesions, "test", "1"))
    assert [r.label for r in results] == [2, 1]
    for result in results:
        alone = extractor.extract_arrays(hu, labels, SPACING, label=result.label)
        np.testing.assert_allclose(result.as_array(), alone.as_array(), rtol=1e-12)
    with pytest.raises(InputRejected, match="grid"):
        extractor.extract(volume, LabelVolume(labels[:2], lesions, "test", "1"))


def test_configuration_section_and_environment_override():
    config = from_mapping(
        {"regional": {"ring_widths_mm": [3, 7.5], "bins": 50}},
        environ={"DICOMNODE_REGIONAL__SHAPE_DEGREE": "6"},
    )
    assert config.regional.ring_widths_mm == (3.0, 7.5)
    extractor = RegionalExtractor.from_config(config.regional)
    assert extractor.feature_names[0] == "wu_ring3_rim_ring_correlation"
    assert len(extractor.feature_names) == 2 * 8 + 4 + 6 + 6 + 4
    widths = from_mapping({}, environ={"DICOMNODE_REGIONAL__RING_WIDTHS_MM": "5,10,15"})
    assert widths.regional.ring_widths_mm == (5.0, 10.0, 15.0)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"ring_widths_mm": ()}, "regional.ring_widths_mm"),
        ({"ring_widths_mm": (5.0, 5.0)}, "widths must differ"),
        ({"bins": 1}, "regional.bins"),
        ({"hu_min": 500.0, "hu_max": -1000.0}, "hu_min < hu_max"),
        ({"shape_degree": 0}, "regional.shape_degree"),
    ],
)
def test_bad_configuration_names_the_key(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RegionalExtractor(RegionalConfig(**changes))
