"""`imagenet-a`: ImageNet-A (Hendrycks et al., 2021), 200 classes, 7,500 natural adversarial images.

Split: the pre-split ``train/`` and ``test/`` folders that ADAM/RevisitingCIL and LAMDA-PILOT
distribute and the SD-LoRA official code reads (``ina.zip``; about 5,981 / 1,519 in the ADAM
tables; the count check asserts the 7,500 total). Google Drive id from the RevisitingCIL README;
MD5 posted by its maintainer (RevisitingCIL issue #5). Class ids: sorted class-folder indices
(ImageFolder). Class order: ``np.random.seed(1993); permutation(200)`` → 168, 136, 51, 9, 183, 101,
...; 10 tasks × 20 classes as in SD-LoRA's Table 3.

Transforms and loader: as ``imagenet-r`` (SD-LoRA's ``build_transform``: train RandomResizedCrop(S,
scale=(0.05, 1)) + flip, test Resize(int(S·8/7), bicubic) + CenterCrop(S), ToTensor only, pixels in
[0, 1]; PIL decode, ``--workers`` for parallel loading; throughput measured in ``imagenet_r.py``).
"""
from __future__ import annotations

from clbench.downloads import Remote
from clbench.presplit import PresplitBenchmark
from clbench.registry import register_benchmark

DRIVE_ID = "19l52ua_vvTtttgVRziCZJjal0TPE9f2p"  # RevisitingCIL README, "ImageNet-A" Google Drive link
REMOTES = {
    "adam": Remote.google_drive("ina.zip", DRIVE_ID, md5="7f4aaf0b1532b7a0bd670822c152d3c5",
                               checksum_source="RevisitingCIL issue #5 (maintainer's md5sum)"),
}


@register_benchmark("imagenet-a", "ImageNet-A, 200 classes, ADAM/PILOT pre-split folders, "
                                  "10 tasks × 20; --download")
class ImageNetA(PresplitBenchmark):
    n_classes = 200
    expected_counts = {"adam": 7_500}
    remotes = REMOTES
    folder_name = "imagenet-a"
    protocol = "imagenet-a-adam-presplit"
