"""Finding codes, shared by every format and by the gates."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    code: str
    severity: str  # error (fails the audit), warning or info
    title: str


RULES = {
    r.code: r
    for r in (
        Rule("LIP001", "error", "network Lipschitz bound above --fail-above"),
        Rule("LIP002", "error", "layer norm above --fail-layer-above"),
        Rule("LIP003", "warning", "reshaped-kernel norm understates a convolution's operator norm"),
        Rule("LIP004", "error", "non-finite weights"),
        Rule("LIP005", "warning", "spectral-norm parametrization leaves the weight above norm 1"),
        Rule("LIP006", "info", "network bound covers only part of the network"),
        Rule("LIP007", "info", "all-zero weight"),
        Rule("LIP008", "info", "other parts of the checkpoint were not audited"),
        Rule("LIP009", "warning", "network bound is not certified"),
        Rule("LIP010", "warning", "parametrized weight could not be formed"),
        Rule("LIP011", "warning", "layer shapes show the covered layers are not a simple chain"),
        Rule("LIP012", "error", "normalize: a covered layer could not be brought to the target"),
        Rule("LIP013", "warning", "normalize: convolutions scaled by the reshaped-kernel norm (not certified)"),
        Rule("LIP014", "info", "normalize: tied weights scaled once"),
    )
}
