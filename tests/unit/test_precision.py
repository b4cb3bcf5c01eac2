"""Training arithmetic (`resources.precision`): what auto resolves to, what bf16 computes in, and a bad value."""

import pytest
import torch

from kubedistill.core import spec
from kubedistill.ml import precision
from tests.conftest import minimal_doc


@pytest.mark.parametrize(
    "requested, native, expected",
    [("auto", True, "bf16"), ("auto", False, "fp32"), ("bf16", False, "bf16"), ("fp32", True, "fp32")],
)
def test_auto_takes_bf16_only_where_the_device_computes_it_natively(requested, native, expected):
    assert precision.resolve(requested, "cpu", native=native) == expected


def test_the_probe_answers_for_this_machines_cpu_and_no_gpu():
    assert isinstance(precision.native_bf16("cpu"), bool)
    assert precision.native_bf16("cuda") == (torch.cuda.is_available() and torch.cuda.is_bf16_supported(False))
    assert precision.native_bf16("mps") is False


def test_bf16_computes_products_in_bf16_and_fp32_in_fp32():
    a, b = torch.randn(4, 8), torch.randn(8, 2)
    with precision.autocast("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with precision.autocast("fp32", "cpu"):
        assert (a @ b).dtype == torch.float32


def test_an_unknown_precision_is_refused_naming_the_field_and_the_choices():
    with pytest.raises(ValueError, match="fp16.*auto, bf16, fp32"):
        precision.resolve("fp16", "cpu")
    for part in ("teacher", "student"):
        with pytest.raises(ValueError, match=rf"{part}.resources.precision"):
            spec.parse_run(minimal_doc(**{part: {"resources": {"precision": "fp16"}}}))
    assert spec.parse_run(minimal_doc()).spec.student.resources.precision == "auto"
