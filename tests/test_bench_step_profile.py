"""bench/step_profile.py: a step's phases and kernels, at the cpu profile on the CPU."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--profile", "cpu", "--device", "cpu", "--set", "DEPTH=1", "--vocab-size", "512"]


@pytest.fixture(scope="module")
def step_profile() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "step_profile", REPO / "bench" / "step_profile.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("triton_tem_fused_flex_attention_backward_transpose_view_13", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16", "attention"),
        ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("aten::mm", "matmul"),
        ("triton_poi_fused__to_copy__unsafe_view_pow_relu_6", "fused triton"),
        ("Memcpy HtoD (Pinned -> Device)", "copy, fill"),
        ("void at::native::vectorized_elementwise_kernel<4>", "other"),
    ],
)
def test_kernels_are_sorted_into_kinds(step_profile: ModuleType, name: str, kind: str) -> None:
    assert step_profile.kind_of(name) == kind


def test_profiles_a_step_of_the_real_train_py(
    step_profile: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*TINY, "--warm-up", "1", "--steps", "2", "--top", "4"]
    assert step_profile.main(argv) == 0
    out = capsys.readouterr().out
    phases = dict(re.findall(r"^  (\S.*?) +([0-9.]+) ms +[0-9.]+%$", out, re.MULTILINE))
    assert set(phases) >= {"forward+backward", "AdamW step", "Muon step", "matmul"}
    assert all(float(ms) > 0 for ms in phases.values())
    step_ms = float(re.search(r"^one step: ([0-9.]+) ms", out, re.MULTILINE).group(1))
    parts = ["forward+backward", "AdamW step", "Muon step"]
    assert sum(float(phases[p]) for p in parts) == pytest.approx(step_ms, abs=0.2)
    kinds = out.split("\nkernels: ")[1].split("\n\n")[0].splitlines()[1:]
    assert sum(float(line.split()[-1].rstrip("%")) for line in kinds) == pytest.approx(100, abs=0.5)
    longest = out.split("the 4 longest (ms per step, share, kind):\n")[1].splitlines()
    assert len(longest) == 4 and "aten::" in longest[0]


def test_a_bad_setting_is_one_line_and_status_2(
    step_profile: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert step_profile.main([*TINY, "--set", "NO_SUCH_CONSTANT=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("step_profile: error: train.py: NO_SUCH_CONSTANT is not a module-level")
