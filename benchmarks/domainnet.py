"""`domainnet`: DomainNet (Peng et al., ICCV 2019), 345 classes over six domains, 5 tasks × 69.

Data: the six domains' image archives (the "cleaned" release; clipart and painting live under
``groundtruth/``) and the official per-domain ``<domain>_{train,test}.txt`` lists from the M3SDA
project page (csr.bu.edu). MD5s: the ``md5sums`` file of Mila's datalad mirror of these exact URLs
(github.com/datasets-mila/datasets--domainnet); neither the project page nor InfLoRA publishes any.
The per-domain lists are pooled (train with train, test with test) and class-incremental over the
345 classes, the InfLoRA protocol SD-LoRA follows (its official code has no DomainNet loader).
Class ids are the lists' labels (0–344); class order ``np.random.seed(1993); permutation(345)``.
Expected list sizes (409,832 train / 176,743 test for all six domains) are the DomainNet paper's
per-domain counts; they agree with the byte sizes of the MD5-pinned lists but were not counted here.

Deviation to know: InfLoRA (and CODA-Prompt, where its lists come from) read
``dataloaders/splits/domainnet_{train,test}.yaml``, which this harness could not inspect; an open
CODA-Prompt issue (#19) reports that they omit the quickdraw domain. ``--set
domains=clipart,infograph,painting,real,sketch`` runs without quickdraw; every domain subset is a
separate protocol in the split identity.

Transforms: SD-LoRA's (train RandomResizedCrop(S, scale=(0.05, 1)) + flip, test Resize(int(S·8/7),
bicubic) + CenterCrop(S), ToTensor only); InfLoRA uses scale (0.08, 1) and a bilinear Resize.
Loader: PIL decode, ``--workers`` for parallel loading (throughput: see ``imagenet_r.py``).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from clbench.benchmark import Benchmark, SplitData, divisors_as_choices
from clbench.datasets import ImageFiles, split_identity, test_transform, train_transform
from clbench.downloads import Remote, extract_fresh, fetch, missing_data, read_marker, write_marker
from clbench.errors import UsageError
from clbench.registry import register_benchmark

BASE = "http://csr.bu.edu/ftp/visda/2019/multi-source"
DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
ZIP_URL = {"clipart": f"{BASE}/groundtruth/clipart.zip", "infograph": f"{BASE}/infograph.zip",
           "painting": f"{BASE}/groundtruth/painting.zip", "quickdraw": f"{BASE}/quickdraw.zip",
           "real": f"{BASE}/real.zip", "sketch": f"{BASE}/sketch.zip"}
MD5 = {  # datasets-mila/datasets--domainnet, file md5sums
    "clipart.zip": "cd0d8f2d77a4e181449b78ed62bccf1e",
    "infograph.zip": "720380b86f9e6ab4805bb38b6bd135f8",
    "painting.zip": "1ae32cdb4f98fe7ab5eb0a351768abfd",
    "quickdraw.zip": "bdc1b6f09f277da1a263389efe0c7a66",
    "real.zip": "dcc47055e8935767784b7162e7c7cca6",
    "sketch.zip": "658d8009644040ff7ce30bb2e820850f",
    "clipart_train.txt": "b4349693a7f9c05c53955725c47ed6cb",
    "clipart_test.txt": "f5ddbcfd657a3acf9d0f7da10db22565",
    "infograph_train.txt": "379b50054f4ac2018dca4f89421b92d9",
    "infograph_test.txt": "779626b50869edffe8ea6941c3755c71",
    "painting_train.txt": "7db0e7ca73ad9982f6e1f7f3ef372c0a",
    "painting_test.txt": "232b35dc53f26d414686ae579e38d9b5",
    "quickdraw_train.txt": "b732ced3939ac8efdd8c0a889dca56cc",
    "quickdraw_test.txt": "c1a828fdfe216fb109f1c0083a252c6f",
    "real_train.txt": "8ebf02c2075fadd564705f0dc7cd6291",
    "real_test.txt": "6098816791c3ebed543c71ffa11b9054",
    "sketch_train.txt": "1233bd18aa9a8a200bf4cecf1c34ef3e",
    "sketch_test.txt": "d8a222e4672cfd585298aa14d02ea441",
}
_SOURCE = "md5sums of github.com/datasets-mila/datasets--domainnet (mirror of these URLs)"
REMOTES = {
    **{f"{d}.zip": Remote(f"{d}.zip", ZIP_URL[d], md5=MD5[f"{d}.zip"], checksum_source=_SOURCE)
       for d in DOMAINS},
    **{f"{d}_{s}.txt": Remote(f"{d}_{s}.txt", f"{BASE}/domainnet/txt/{d}_{s}.txt",
                              md5=MD5[f"{d}_{s}.txt"], checksum_source=_SOURCE)
       for d in DOMAINS for s in ("train", "test")},
}


@dataclass
class DomainNetConfig:
    domains: str = ",".join(DOMAINS)  # comma-separated subset of the six domains


@register_benchmark("domainnet", "DomainNet, 345 classes, six domains pooled (official lists), "
                                 "5 tasks × 69; --download")
class DomainNet(Benchmark):
    Config = DomainNetConfig
    n_classes = 345
    task_choices = divisors_as_choices(345, range(2, 70))
    default_tasks = 5
    default_seeds = (1993,)
    # (train, test) entries in each official list: DomainNet paper, cleaned release
    expected_counts = {"clipart": (33_525, 14_604), "infograph": (36_023, 15_582),
                       "painting": (50_416, 21_850), "quickdraw": (120_750, 51_750),
                       "real": (120_906, 52_041), "sketch": (48_212, 20_916)}

    def __init__(self, config=None, data_dir=None, download: bool = False):
        super().__init__(config, data_dir, download)
        chosen = [d.strip() for d in self.config.domains.split(",") if d.strip()]
        unknown = sorted(set(chosen) - set(DOMAINS))
        if not chosen or unknown or len(set(chosen)) != len(chosen):
            raise UsageError(f"domainnet: domains={self.config.domains!r} is not a comma-separated "
                             f"subset of {','.join(DOMAINS)}")
        self.domains = [d for d in DOMAINS if d in chosen]  # canonical order

    @property
    def folder(self) -> Path:
        return self.root / "domainnet"

    @property
    def protocol(self) -> str:
        return "m3sda-lists-" + ("all" if len(self.domains) == len(DOMAINS) else "+".join(self.domains))

    def load(self, image_size: int) -> SplitData:
        if read_marker(self.folder, self.protocol) is None:
            self._prepare()
        (train_files, train_labels), (test_files, test_labels) = self._lists()
        identity = split_identity(self.protocol, (train_files, train_labels),
                                  (test_files, test_labels))
        root = self.folder / "images"
        return SplitData(ImageFiles(root, train_files, train_labels, train_transform(image_size)),
                         ImageFiles(root, test_files, test_labels, test_transform(image_size)),
                         identity)

    def _prepare(self) -> None:
        if not self.download:
            extra = "" if len(self.domains) == len(DOMAINS) else f"--set domains={','.join(self.domains)}"
            raise missing_data(self.name, self.folder, self.root, extra)
        for domain in self.domains:
            for split in ("train", "test"):
                fetch(REMOTES[f"{domain}_{split}.txt"], self.folder)
            if not (self.folder / "images" / domain).is_dir():
                archive = fetch(REMOTES[f"{domain}.zip"], self.folder)
                staged = extract_fresh(archive, self.folder / f"extract-{domain}")
                if not (staged / domain).is_dir():
                    raise UsageError(f"domainnet: {archive.name} has no top-level {domain}/ folder; "
                                     f"delete {archive} and rerun with --download")
                (self.folder / "images").mkdir(exist_ok=True)
                (staged / domain).rename(self.folder / "images" / domain)
                shutil.rmtree(staged)  # whatever else the zip held
        for domain in self.domains:
            for index, split in enumerate(("train", "test")):
                files, _ = _read_list(self.folder / f"{domain}_{split}.txt")
                expected = self.expected_counts[domain][index]
                if len(files) != expected:
                    raise UsageError(f"domainnet: {domain}_{split}.txt lists {len(files)} images, "
                                     f"expected {expected}; delete it and rerun with --download")
                missing = [f for f in files if not (self.folder / "images" / f).is_file()]
                if missing:
                    raise UsageError(f"domainnet: {len(missing)} images of {domain}_{split}.txt are "
                                     f"missing (e.g. {missing[0]}); delete "
                                     f"{self.folder / 'images' / domain} and rerun with --download")
        (train, train_labels), (test, test_labels) = self._lists()
        if len(set(train_labels)) != self.n_classes:
            raise UsageError(f"domainnet: the {self.protocol} training lists hold "
                             f"{len(set(train_labels))} classes, expected {self.n_classes}")
        write_marker(self.folder, self.protocol, {"domains": self.domains, "n_train": len(train),
                                                  "n_test": len(test)})

    def _lists(self):
        pooled = []
        for split in ("train", "test"):
            files, labels = [], []
            for domain in self.domains:
                more_files, more_labels = _read_list(self.folder / f"{domain}_{split}.txt")
                files += more_files
                labels += more_labels
            pooled.append((files, labels))
        return pooled


def _read_list(path: Path) -> tuple[list[str], list[int]]:
    """``<domain>/<class>/<file> <label>`` per line → (relative paths, labels)."""
    files, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, _, label = line.strip().rpartition(" ")
        if not name or not label.isdigit():
            raise UsageError(f"domainnet: {path}:{number} is not '<path> <label>'")
        files.append(name)
        labels.append(int(label))
    return files, labels
