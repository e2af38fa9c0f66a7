import sys, time, json
from pathlib import Path
import mergelab.svd_methods  # noqa
from mergelab.bench import report, runner, suite as S
suite = S.get_suite("text6")
rows = [S.MethodSpec("ties_wide", "ties", grid={"density": [0.1, 0.2], "lambda": [0.3, 0.4, 0.5, 0.7]},
                     params={"merge": "mean", "trim_scope": "global"}),
        S.MethodSpec("task_arithmetic_wide", "task_arithmetic", grid={"lambda": [0.05, 0.1, 0.15, 0.2]})]
def progress(desc, total):
    print(f"[{time.strftime('%H:%M:%S')}] {desc}", file=sys.stderr, flush=True)
    return runner._null_progress(desc, total)
result = runner.run_benchmark(suite, threads=1, methods=rows, progress=progress)
report.write_report(result, "runs/extra", plots=False)
print(report.markdown_table(result))
