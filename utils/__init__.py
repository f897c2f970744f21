"""The training framework around the library (run from the repository root; not installed).

The application layer: ``run`` a run's identity, folder layout, recipe resolution and the guards of
a finished or continued run (torch-free); ``modes`` do_acnet.py's command line and table of modes
(train, eval, convert, export, qat) over the typed ``command``; ``errors`` the framework's
user-facing errors and the scripts' one error line; ``runs`` reading run folders (torch-free),
``report`` the tables and Welch comparisons, ``plotting`` matplotlib and show_log.py's plot.

The modes' code: ``training`` (train, resume, post-training), ``evaluation`` evaluate / compare /
load weights for evaluation (``--eval-only``), ``conversion`` (``--convert``), ``deploy``
(``--export-onnx``, ``--quantize``), ``qat`` (``--qat``), ``init_weights`` (``--init-weights``).
The engine parts: ``distributed`` process group from torchrun / torch.distributed.launch and
collectives; ``optim`` parameter groups and the per-iteration cosine schedule; ``metrics``
device-side top-k sums; ``checkpoint`` resumable state and RNG state; ``runlog`` log.txt and
TensorBoard; ``engine`` the training loop; ``posttrain`` conversion, deploy check and summary.json;
``guards`` checks against silently doing something else; ``stats`` mean, std and Welch's t-test
over seeds (standard library only).
"""
