"""The training framework around the library (run from the repository root; not installed), by what it does.

* ``modes``: do_acnet.py's modes. ``registry`` the table (each mode's option, arguments, checks, options
  and runner, declared once), ``cli`` the command line over it; the runners ``train`` (train, resume,
  post-training), ``evaluate`` (``--eval-only``), ``convert`` (``--convert``), ``export``
  (``--export-onnx [--quantize]``), ``qat`` (``--qat``). The table and the parser import no torch.
* ``engine``: what the modes drive (torch). ``trainer`` the training loop, ``optim`` parameter groups and
  the cosine schedule, ``distributed`` the process group and collectives, ``metrics`` device-side top-k
  sums, ``evaluation`` evaluate / compare / load weights for evaluation, ``init_weights``
  (``--init-weights``), ``posttrain`` conversion, deploy check and summary.json, ``deploy`` ONNX export,
  int8 PTQ and onnxruntime evaluation, ``guards`` checks against silently doing something else.
* ``rundir``: a run folder. ``identity`` its identity, name, files and recipe resolution (torch-free),
  ``record`` its record, lock and state (torch-free), ``checkpoint`` its resumable state, ``log`` log.txt
  and TensorBoard.
* ``analysis``: reading runs and reporting on them (torch-free). ``collect`` run folders, ``tables`` the
  tables and Welch comparisons, ``stats`` mean, std and Welch's t-test, ``plotting`` show_log.py's plot.
* ``command`` the typed command every mode gets; ``errors`` the user-facing errors and the one error line.
"""
