"""The seed streams of the data layer: one tag per use of a run's seed.

Every permutation the data layer draws is seeded with `[*seed key, tag, counter]`
(`np.random.default_rng`), so the document order of an epoch, a mixture's block schedule
and a stream's file order are independent draws from one seed. The tags are part of the
data order: changing a value changes which rows every saved run sees after a resume, so
the values are fixed forever and a new use takes a new value.
"""
import enum


class SeedStream(enum.IntEnum):
    DOC_ORDER = 1          # An in-memory task's document and row orders of one epoch.
    MIX_ORDER = 2          # A mixture's seeded slots within one block of rows.
    FILE_ORDER = 3         # A streamed task's file order of one epoch.
    COMPONENT_STREAMS = 4  # The streams of one streamed component of a mixture.
    IMAGE_ORDER = 5        # An image split's example order per epoch, and a step's augmentation.
