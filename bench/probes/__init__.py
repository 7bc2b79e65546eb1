"""Probes: measurements of single programs, kernels and dispatch behaviour at real shapes
(ssd_timing, step_programs, dispatch_probe, kernel_bench, hlo_stats)."""
