"""Research tools built on the cache and the op, kept apart from the backend they do not feed.

- `geometry`: attention-geometry probes per layer (`gaugecompile probe`), which an edit of the cache preserves;
- `geometry_plot`: those probes drawn per layer (a PNG);
- `placement`: spliced chunks placed with real-valued gaps, learnt by gradient descent through the op's delta
  gradients, beside a grid search;
- `wind_tunnel`: a Bayesian wind tunnel (bijection elimination, whose posterior is known in closed form) to read
  the probes on a model whose task has a right answer.

Nothing here is imported by `import gaugecompile`; the backend, cache and ops never import it.
"""
