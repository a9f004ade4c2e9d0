"""`edgemoe bench` and `edgemoe bench --cluster N`.

- `page_cache`: drop, warm and inspect the page cache; which reads could reach the disk.
- `disk`: the disk's raw read bandwidth (our pread loop, and fio).
- `decode`: timed decode on the streaming model, its counters at every token.
- `reference`: plain mlx-lm on the same weights.
- `dead_peer`: peers configured but all down, against no peers.
- `cached`: every expert cached, resident layers against host routing.
- `transfer`: host-to-device bandwidth, the warm case's bound.
- `run`: `edgemoe bench`, every stage into one report.
- `cluster`: `edgemoe bench --cluster N`, nodes on this machine against the cluster bound.
- `predict`: the performance model's measured inputs (shared with `edgemoe plan`) and the bench's predictions.
- `report`: both text reports.
"""

from .cluster import run_cluster_bench
from .report import format_cluster_report, format_report
from .run import run_bench

__all__ = ["format_cluster_report", "format_report", "run_bench", "run_cluster_bench"]
