"""kNN probe during pretraining: a labeled folder decoded once, embedded with the live parameters.

The protocol of `contrastive evaluate` (encoder features h, L2-normalised; a seeded per-class split;
`evaluate.knn_accuracy`), but on the train state in memory: no checkpoint is read, the folder is
decoded once at the model's image size, and the forward pass is compiled once for the run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

from ..config import TrainConfig
from ..data.cache import load_cached
from ..data.decode import load_folder
from ..infer.encoder import embed_in_batches, sharded_forward
from ..infer.knn import KNN_K, class_labels, knn_accuracy, stratified_split

TEST_FRACTION = 0.2  # as `contrastive evaluate`'s default
CHUNK = 256  # images per forward pass (rounded up to a multiple of the device count)


class KnnProbe:
    """kNN accuracy of the current encoder on a labeled folder (class = first-level subfolder).

    Build it before training (decoding and label errors surface before anything is written), then
    call it with the train state's params and stats and the centre and whitening a checkpoint of
    that state would hold (encoder.readout_stats), so it scores what `embed` would write:
    `probe(graphdef, mesh, params, stats, centre, whitening) -> float`.
    Every process must call it together (the forward pass is one sharded program).
    """

    def __init__(self, folder: Path, cfg: TrainConfig, *, cache: bool = True, on_progress=None, on_warning=None):
        self.folder, self.cfg = Path(folder), cfg
        size = cfg.model.image_size  # as `embed`: shorter side resized to the view size, centre crop
        if cache:
            data = load_cached(self.folder, size, on_progress=on_progress, on_warning=on_warning)[0]
        else:
            data = load_folder(self.folder, size, on_progress=on_progress)
        self.labels, self.classes = class_labels(data.paths, self.folder)
        self.train, self.test = stratified_split(self.labels, TEST_FRACTION, seed=cfg.seed)
        self.images = np.asarray(data.images)  # uint8 [N, S, S, 3]
        self.skipped = data.skipped
        self._forward = None

    def __len__(self) -> int:
        return len(self.labels)

    def embed(self, graphdef: nnx.GraphDef, mesh, params, stats, centre: np.ndarray, whitening=None) -> np.ndarray:
        """float32 [N, D] unit embeddings of the folder's images, row i <-> label i."""
        if self._forward is None:
            self._forward = sharded_forward(graphdef, self.cfg, mesh)
        return embed_in_batches(self._forward, params, stats, self.images, mesh, min(CHUNK, len(self)),
                                centre=centre, whitening=whitening)

    def __call__(self, graphdef: nnx.GraphDef, mesh, params, stats, centre: np.ndarray, whitening=None) -> float:
        emb = self.embed(graphdef, mesh, params, stats, centre, whitening)
        tr, te = self.train, self.test
        return knn_accuracy(emb[tr], self.labels[tr], emb[te], self.labels[te], k=KNN_K)
