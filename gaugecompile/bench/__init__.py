"""The benchmark suite, installed with the package so `gaugecompile bench` runs from a wheel.

- `suite`: every scenario side by side with the real alternative (`gaugecompile bench`, `benchmarks/run.py`): the
  run and the scenarios on the loaded model; `synthetic` the scenarios on random pools (reorganisation, decode
  attention), `measure` how they time, `report` the tables and plots;
- `decode_loops`, `prompts`: the decode loops and prompts the suite, `gaugecompile demo` and the examples share;
- `op_cpu`, `cache_ops`: focused CPU timings of the op and of the cache edits;
- `gpu_decode`: the generated Triton kernels against copy bandwidth and SDPA on a CUDA machine;
- `baselines`: the alternatives that transformers no longer ships (a re-rotating sink cache).

`benchmarks/*.py` in a source checkout are thin scripts over these modules. Nothing here imports the command
line (`gaugecompile.cli`), which imports this.
"""
