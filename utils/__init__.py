"""The training framework's engine parts (run from the repository root; not installed).

``distributed`` process group from torchrun / torch.distributed.launch and collectives;
``optim`` parameter groups and the per-iteration cosine schedule; ``metrics`` device-side top-k
sums; ``evaluation`` evaluate / compare / load weights for evaluation; ``checkpoint`` the
experiment folder's files, resumable state and RNG state; ``runlog`` log.txt and TensorBoard;
``engine`` the training loop; ``posttrain`` conversion, deploy check and summary.json; ``stats`` mean,
std and Welch's t-test over seeds (standard library only, for show_log.py).
"""
