"""`cub200`: CUB-200-2011 birds, 200 classes, 11,788 images.

Split: the pre-split ``train/`` and ``test/`` folders that ADAM/RevisitingCIL and LAMDA-PILOT
distribute and the SD-LoRA official code reads (``cub.zip``; about 9,430 / 2,358 in the ADAM
tables; the count check asserts the 11,788 total). Google Drive id from the RevisitingCIL README;
MD5 posted by its maintainer (RevisitingCIL issue #5). Class ids: sorted class-folder indices
(ImageFolder). Class order: ``np.random.seed(1993); permutation(200)``; 10 tasks × 20 classes as in
SD-LoRA's App. A.3 (Table 6).

Transforms and loader: as ``imagenet-r`` (SD-LoRA's ``build_transform``: train RandomResizedCrop(S,
scale=(0.05, 1)) + flip, test Resize(int(S·8/7), bicubic) + CenterCrop(S), ToTensor only, pixels in
[0, 1]; PIL decode, ``--workers`` for parallel loading; throughput measured in ``imagenet_r.py``).
"""
from __future__ import annotations

from clbench.downloads import Remote
from clbench.presplit import PresplitBenchmark
from clbench.registry import register_benchmark

DRIVE_ID = "1XbUpnWpJPnItt5zQ6sHJnsjPncnNLvWb"  # RevisitingCIL README, "CUB200" Google Drive link
REMOTES = {
    "adam": Remote.google_drive("cub.zip", DRIVE_ID, md5="85e342a2d5f941e740193602057df7a5",
                               checksum_source="RevisitingCIL issue #5 (maintainer's md5sum)"),
}


@register_benchmark("cub200", "CUB-200-2011, 200 classes, ADAM/PILOT pre-split folders, "
                              "10 tasks × 20; --download")
class CUB200(PresplitBenchmark):
    n_classes = 200
    expected_counts = {"adam": 11_788}
    remotes = REMOTES
    folder_name = "cub"
    protocol = "cub200-adam-presplit"
