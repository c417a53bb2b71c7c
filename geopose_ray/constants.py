"""Constants of the Overhead Geopose Challenge data contract (docs/GEOPOSE.md, 'Data layout' to 'Submission')."""

CITIES: tuple[str, ...] = ("ARG", "ATL", "JAX", "OMA")  # city index = position in this tuple
AGL_NODATA: int = 65535  # uint16 cm placeholder for "no lidar return"
AGL_MAX_CM: int = 65534  # submissions clip to [0, AGL_MAX_CM] before the uint16 cast
CM_PER_M: float = 100.0
SUBMISSION_ARCHIVE: str = "submission_compressed.tar.gz"
TTA_VIEWS: dict[str, int] = {"none": 1, "flip": 4, "d4": 8}  # test-time modes (tta.TTA_MODES), their views
TTA_NAMES: tuple[str, ...] = tuple(TTA_VIEWS)  # D4 is what the ensemble delivers by default


def city_index(city: str) -> int:
    """Index of `city` in CITIES; raises KeyError for an unknown city."""
    try:
        return CITIES.index(city)
    except ValueError:
        raise KeyError(city) from None

# BatchNorm's statistics are re-measured after the last epoch on whole training tiles
# (geopose_ray/precise_bn.py): every one, up to BN_PX pixels (3 derived epochs' crop pixels),
# at least MIN_BN_TILES, in batches of at least BN_BATCH (the tiles of one batch normalise
# each other meanwhile, as in training: more tiles, statistics closer to the population's)
BN_PX = 3 * 320 * 64 * 64
MIN_BN_TILES = 64
BN_BATCH = 8
# The re-measures before ASHA's rungs (train.precise_bn_every) only rank trials, and may read
# fewer large tiles: on 384 px tiles, 32 of them scored within 0.011 of 64 on single views
# (2 models x 2 subsets), while 16 moved them by up to 0.09 (docs/LEARNING.md, 'What the rungs
# of ASHA compare')
MIN_RUNG_BN_TILES = 32


def bn_tile_count(train_tiles: int, side: int, min_tiles: int = MIN_BN_TILES) -> int:
    """Whole tiles of `side` px that one re-measure reads: up to BN_PX pixels, at least
    `min_tiles`, never more than the `train_tiles` there are (precise_bn and the plan's cost)."""
    return min(train_tiles, max(min_tiles, BN_PX // max(1, side * side)))
