"""The distillation loss: which divergence, temperature, and how it mixes with cross-entropy.

Embedded as ``loss:`` in the distill config. The definitions live in ``train/distill/losses.py``
(its module docstring states every formula); the fields here only choose among them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cluster.config.base import StrictModel


class KDLossConfig(StrictModel):
    kind: Literal["fkl", "rkl", "jsd"] = Field(
        "fkl",
        description="Divergence between teacher p and student q (both at temperature T): "
        "fkl = KL(p||q) (Hinton KD), rkl = KL(q||p) (MiniLLM), "
        "jsd = generalized JSD(beta) = beta*KL(p||M) + (1-beta)*KL(q||M), M = beta*p + (1-beta)*q (TRL GKD).",
    )
    temperature: float = Field(
        2.0, gt=0, description="Softmax temperature T applied to teacher and student logits for the KD term."
    )
    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Weight of the KD term: loss = alpha*T^2*KD + (1-alpha)*CE for every kind "
        "(T^2 keeps the soft-target gradient scale independent of T); alpha=1 is pure KD, 0 pure CE.",
    )
    beta: float = Field(
        0.5,
        ge=0,
        le=1,
        description="JSD interpolation (kind=jsd only): 0 is exactly forward KL, 1 exactly reverse KL (TRL's endpoints).",
    )
    hidden_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of an extra MSE between the student's final hidden state, mapped by a learned "
        "linear HiddenProjector(d_student, d_teacher), and the teacher's; 0 = off. Needs an online (dense) teacher.",
    )
    topk_rest: Literal["bucket", "ignore"] = Field(
        "bucket",
        description="Top-k teacher only. bucket: the teacher's mass outside its top-k (1 - sum p_topk) is a (k+1)-th "
        "bucket compared with the student's mass outside the same ids (exact at T=1; at T!=1 the teacher's tail "
        "is assumed uniform). ignore: both distributions are renormalised over the teacher's top-k ids (DistillKit).",
    )
