"""`gaugecompile.bench.gpu_decode`'s pure parts on the CPU: the table kinds it measures and the table it prints."""

import pytest
import torch

from gaugecompile.bench import gpu_decode


def test_gpu_decode_table_kinds():
    g = torch.Generator().manual_seed(0)
    table, delta = gpu_decode.make_table(2, 4, "contiguous", g, device="cpu")
    assert table.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and not delta.any()
    table, delta = gpu_decode.make_table(2, 4, "one-delta", g, device="cpu")
    assert table.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and delta.dtype == torch.int64
    assert (delta == delta[:, :1]).all() and delta.any()
    table, delta = gpu_decode.make_table(2, 4, "fragmented", g, device="cpu")
    assert sorted(table.flatten().tolist()) == list(range(8)) and delta.shape == (2, 4)
    with pytest.raises(ValueError, match="kind"):
        gpu_decode.make_table(1, 1, "spiral", g, device="cpu")


def test_gpu_decode_table_lines_show_dtype_table_and_same_bytes_copy():
    header = dict(device="H200", torch="t", triton="tr", date="d", heads=32, kv_heads=8, head_dim=128, block_size=16,
                  dtype="float16, bfloat16", copy_GBps=4000.0)
    row = dict(dtype="float16", table="one-delta", batch=1, context=8192, splits=16, op_ms=0.01, op_GBps=3400.0,
               pct_of_copy=85.0, pct_of_same_bytes_copy=90.0, sdpa_gathered_ms=0.02, gather_rerotate_sdpa_ms=0.5,
               speedup_vs_gather=50.0, max_rel_err=1e-3)
    lines = gpu_decode.table_lines(header, [row, dict(row, pct_of_same_bytes_copy=None, context=1024)])
    assert "| float16 | one-delta | 1 | 8192 | 16 |" in lines[5] and "| 85 | 90 |" in lines[5]
    assert "| 85 | - |" in lines[6]
    assert lines[-2].startswith("# context >= 8k at >= 80% of copy bandwidth: 1/1")
    assert lines[-1] == "# context >= 8k at >= 80% of a copy of the same bytes: 1/1"
