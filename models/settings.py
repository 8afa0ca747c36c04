"""Training settings: one typed object, validated before any work starts, recorded in the manifest."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitSettings(_Strict):
    holdout_days: int = Field(30, ge=1, le=180, description="length of the test window after the cutoff")
    validation_days: int = Field(30, ge=7, le=180, description="blender label window just before the cutoff")
    min_history_days: int = Field(60, ge=14, description="data needed before the validation window")
    min_holdout_days: int = Field(7, ge=1, description="least data after the cutoff for an evaluation")


class CFSettings(_Strict):
    factors: int = Field(64, ge=2, le=512)
    regularization: float = Field(0.05, gt=0)
    alpha: float = Field(1.0, gt=0, description="confidence scale on the weighted matrix")
    iterations: int = Field(15, ge=1, le=200)
    # BM25 damps heavy wholesale buyers and very popular items; log counts are the simpler alternative.
    weighting: Literal["bm25", "log"] = "bm25"
    bm25_k1: float = Field(100.0, gt=0)
    bm25_b: float = Field(0.8, ge=0, le=1)


class ContentSettings(_Strict):
    profile_items: int = Field(20, ge=1, le=200, description="most recent items in the user profile")
    encode_batch_size: int = Field(64, ge=1, le=1024)


class CandidateSettings(_Strict):
    n_cf: int = Field(100, ge=1, le=1000)
    n_content: int = Field(50, ge=1, le=1000)
    n_history: int = Field(100, ge=1, le=1000)
    n_popular: int = Field(50, ge=1, le=1000)
    history_half_life_days: float = Field(60.0, gt=0)


class BlenderSettings(_Strict):
    num_leaves: int = Field(31, ge=2)
    learning_rate: float = Field(0.05, gt=0, le=1)
    n_estimators: int = Field(400, ge=1)
    min_data_in_leaf: int = Field(50, ge=1)
    feature_fraction: float = Field(0.9, gt=0, le=1)
    early_stopping_rounds: int = Field(40, ge=1)
    valid_fraction: float = Field(0.15, gt=0, lt=1, description="share of label users held out for stopping")


class TrainSettings(_Strict):
    split: SplitSettings = SplitSettings()
    cf: CFSettings = CFSettings()
    content: ContentSettings = ContentSettings()
    candidates: CandidateSettings = CandidateSettings()
    blender: BlenderSettings = BlenderSettings()
    seed: int = 42
    # Two cores: more threads than that oversubscribes and costs more than it gives.
    num_threads: int = Field(2, ge=1, le=64)
