"""Finding codes, shared by every format, the gates and the configuration."""

from __future__ import annotations

from dataclasses import dataclass

from lipaudit.report import Finding
from lipaudit.types import Severity


@dataclass(frozen=True)
class Rule:
    code: str
    severity: Severity  # error (fails the audit), warning or info
    title: str


RULES = {
    r.code: r
    for r in (
        Rule("LIP001", Severity.ERROR, "network Lipschitz bound above --fail-above"),
        Rule("LIP002", Severity.ERROR, "layer norm above --fail-layer-above"),
        Rule("LIP003", Severity.WARNING, "reshaped-kernel norm understates a convolution's operator norm"),
        Rule("LIP004", Severity.ERROR, "non-finite weights"),
        Rule("LIP005", Severity.WARNING, "spectral-norm parametrization leaves the weight above norm 1"),
        Rule("LIP006", Severity.INFO, "network bound covers only part of the network"),
        Rule("LIP007", Severity.INFO, "all-zero weight"),
        Rule("LIP008", Severity.INFO, "other parts of the checkpoint were not audited"),
        Rule("LIP009", Severity.WARNING, "network bound is not certified"),
        Rule("LIP010", Severity.WARNING, "parametrized weight could not be formed"),
        Rule("LIP011", Severity.WARNING, "layer shapes or names show the covered layers may not be a simple chain"),
        Rule("LIP012", Severity.ERROR, "normalize: a covered layer could not be brought to the target"),
        Rule("LIP013", Severity.WARNING, "normalize: convolutions scaled by the reshaped-kernel norm (not certified)"),
        Rule("LIP014", Severity.INFO, "normalize: tied weights scaled once"),
        Rule("LIP015", Severity.WARNING, "a layer's bound is looser than asked (a time or size budget was hit)"),
        Rule("LIP016", Severity.WARNING, "a tensor that may act on the signal is not covered"),
        Rule("LIP017", Severity.ERROR, "a gate was given a bound that is not certified"),
        Rule("LIP018", Severity.INFO, "convolution grouping unknown: lower ends hold for every grouping"),
        Rule("LIP019", Severity.WARNING, "no layer of the network could be bounded"),
        Rule("LIP020", Severity.INFO, "normalize: divide mode scaled layers up to the target"),
        Rule("LIP024", Severity.INFO, "spectral_norm layout of a square weight not known: both layouts covered"),
        Rule("LIP025", Severity.WARNING, "--assume chain certifies a product that shapes or names hint is not a chain"),
        Rule("LIP026", Severity.ERROR, "normalize --network-target: the rescaled network's certified bound is above "
             "the target; nothing written"),
    )
}


def finding(code: str, tensor: str | None, message: str, severity: Severity | None = None) -> Finding:
    return Finding(code, str(severity or RULES[code].severity), tensor, message)
