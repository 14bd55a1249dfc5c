"""Whether the compiled step's one-row graph is being traced or run: server/engine/compiled.py sets it around that
graph's calls, and the CPU's linear layers (server/model/cpu_linear.py) read it to compute `x @ W.T` as one reduction
over a plain weight instead of calling oneDNN.

A step of one token (one request decoding) reads every weight once, so its matrix products are matrix-vector
products, bound by how fast they read the weights: oneDNN's read its packed weights at ~17 GB/s here (AMD EPYC,
2 threads) where the memory gives ~49. Layers that keep their weight plain (`keep_plain`) then compute the product
as products summed over the inputs, which the compiler makes one vectorized reduction per layer: a SmolLM2-135M
decode step went from 41.6 to 23.9 ms (docs/performance.md). Only for one row: with more, such a sum reads the
weight once per row."""

ONE_ROW: list[bool] = [False]
