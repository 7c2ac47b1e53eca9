"""Image quality and text alignment beside the copy rate (METHODS 1.3 and 4).

A small public API in the manner of clean-fid::

    from memaudit.quality import kid, fd, resolve_spaces, reference_sample
    spaces = resolve_spaces(["auto"], index=index, is_canary=True)
    ref = spaces[0].features(reference_sample(index, 500, seed=0).tensor((16, 16)))
    gen = spaces[0].features(images01)
    kid_mean, kid_std = kid(gen, ref)      # unbiased; std over subsets
    fid_like = fd(gen, ref)                # biased at small n: compare at equal n only

Every figure is reported with its feature space's `name` and its n (docs/report.md).
"""

from memaudit.quality.features import (
    FID_INCEPTION_SHA256,
    DigitFeatures,
    EmbedderFeatures,
    FeatureSpace,
    InceptionFeatures,
    resolve_spaces,
)
from memaudit.quality.metrics import default_subset_size, fd, kid
from memaudit.quality.reference import ReferenceSample, images_to_tensor, reference_sample

__all__ = ["FID_INCEPTION_SHA256", "DigitFeatures", "EmbedderFeatures", "FeatureSpace",
           "InceptionFeatures", "ReferenceSample", "default_subset_size", "fd",
           "images_to_tensor", "kid", "reference_sample", "resolve_spaces"]
