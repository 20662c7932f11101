import pytest

from napari_hrseg.errors import RegionError
from napari_hrseg.geometry import Region


def test_level_round_trip_is_exact_for_non_halving_levels():
    # SVS: 4443 rows at level 0, 2221 at level 1 -> dy is not 2.
    ds = (4443 / 2221, 6001 / 3000)
    whole = Region(0, 0, 2221, 3000).from_level(ds)
    assert whole == Region(0, 0, 4443, 6001)
    assert Region(0, 0, 4443, 6001).to_level(ds) == Region(0, 0, 2221, 3000)


@pytest.mark.parametrize("region", [Region(3, 5, 17, 9), Region(0, 0, 1, 1), Region(100, 7, 33, 64)])
@pytest.mark.parametrize("ds", [(2.0, 2.0), (4.0, 4.0), (2.0004, 1.9996), (3.0, 3.0)])
def test_to_level_covers_region(region, ds):
    lev = region.to_level(ds)
    back = lev.from_level(ds)
    assert back.contains(region)
    # Outward rounding adds less than one level pixel on each side.
    assert back.height - region.height < 2 * ds[0] + 1
    assert back.width - region.width < 2 * ds[1] + 1


def test_clip_intersect_expand():
    r = Region(-5, -5, 20, 20)
    assert r.clip((10, 12)) == Region(0, 0, 10, 12)
    assert Region(0, 0, 4, 4).intersect(Region(10, 10, 2, 2)).is_empty
    assert Region(10, 10, 4, 6).expand(2) == Region(8, 8, 8, 10)
    assert Region(10, 10, 4, 6).relative_to(Region(8, 8, 8, 10)) == Region(2, 2, 4, 6)


def test_grid_covers_exactly():
    r = Region(3, 4, 100, 70)
    tiles = list(r.grid(32))
    assert sum(t.area for t in tiles) == r.area
    assert all(r.contains(t) for t in tiles)


def test_bad_regions_raise_clear_errors():
    with pytest.raises(RegionError, match="negative size"):
        Region(0, 0, -1, 4)
    with pytest.raises(RegionError, match="whole number"):
        Region(0.5, 0, 1, 1)
    with pytest.raises(RegionError, match="row,col,height,width"):
        Region.parse("1,2,3")
    assert Region.parse("1, 2, 3, 4") == Region(1, 2, 3, 4)
