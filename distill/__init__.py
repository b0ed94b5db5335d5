"""distill: move a large reasoning teacher's next-token distribution into a small quantized student.

Core library: the teacher cache format (`distill.cache`), the distillation losses (`distill.losses`),
data loading (`distill.data`), run configuration (`distill.config`) and metrics.
"""

__version__ = "0.1.0"
