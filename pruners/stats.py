"""Calibration statistics accumulated by hooks (docs/methods.md §1.1, §3.2, §3.3, §12 "Numerics").

Everything is accumulated in fp32 (or fp64) as a running mean over tokens, so that the scale does
not grow with the number of samples; every consumer damps relative to the mean diagonal, so the
absolute scale never matters.
"""

from __future__ import annotations

import torch


class Statistic:
    def __init__(self, dim: int, device, dtype=torch.float32):
        self.dim, self.device, self.dtype = dim, device, dtype
        self.count = 0

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        # cast before the matmul, not after (fp16 activations would overflow in the product)
        return x.reshape(-1, x.shape[-1]).to(self.dtype)

    def add(self, x: torch.Tensor) -> None:
        raise NotImplementedError


class Hessian(Statistic):
    """``H = (2/N) sum_t x_t x_t^T`` over the N calibration tokens (the layer-wise OBS Hessian)."""

    def __init__(self, dim, device, dtype=torch.float32):
        super().__init__(dim, device, dtype)
        self.matrix = torch.zeros(dim, dim, device=device, dtype=dtype)

    def add(self, x):
        rows = self._rows(x)
        new = rows.shape[0]
        self.matrix *= self.count / (self.count + new)
        self.count += new
        rows = rows * (2.0 / self.count) ** 0.5
        self.matrix.addmm_(rows.T, rows)


class ColumnSquares(Statistic):
    """``mean_t x_{t,j}^2`` per input feature j (Wanda's ``||X_j||_2^2`` up to the token count)."""

    def __init__(self, dim, device, dtype=torch.float32):
        super().__init__(dim, device, dtype)
        self.mean_sq = torch.zeros(dim, device=device, dtype=dtype)

    def add(self, x):
        rows = self._rows(x)
        new = rows.shape[0]
        self.mean_sq *= self.count / (self.count + new)
        self.count += new
        self.mean_sq += rows.pow(2).sum(0) / self.count

    @property
    def norm(self) -> torch.Tensor:
        """``||X_j||_2`` up to a common factor."""
        return self.mean_sq.sqrt()


def wanda_score(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||`` broadcast over rows (Wanda Eq. 1, docs/methods.md §3.2; OWL's outlier metric, §3.4)."""
    return weight.abs() * input_norm.to(weight.dtype).unsqueeze(0)


class ChannelMoments(Statistic):
    """Per input feature j: mean ``x̄_j``, sample variance (FLAP's "fluctuation") and mean square.

    Batches are merged with Chan et al.'s parallel update of (mean, sum of squared deviations), which
    stays accurate in fp32 where ``E[x^2] - E[x]^2`` would cancel.
    """

    def __init__(self, dim, device, dtype=torch.float32):
        super().__init__(dim, device, dtype)
        self.mean = torch.zeros(dim, device=device, dtype=dtype)
        self.m2 = torch.zeros(dim, device=device, dtype=dtype)

    def add(self, x):
        rows = self._rows(x)
        new = rows.shape[0]
        batch_mean = rows.mean(0)
        batch_m2 = (rows - batch_mean).pow(2).sum(0)
        total = self.count + new
        delta = batch_mean - self.mean
        self.mean += delta * (new / total)
        self.m2 += batch_m2 + delta.pow(2) * (self.count * new / total)
        self.count = total

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased sample variance over tokens (FLAP's ``fluc_inp``)."""
        return self.m2 / max(self.count - 1, 1)

    @property
    def mean_square(self) -> torch.Tensor:
        return self.m2 / max(self.count, 1) + self.mean.pow(2)


def statistic_state(stat: Statistic) -> dict:
    """A statistic as plain data (its class name, token count, width, dtype and tensors on the CPU): what the sweep
    cache stores (runners/reuse.py); :func:`statistic_from_state` makes it again."""
    tensors = {k: v.detach().cpu().clone() for k, v in vars(stat).items() if isinstance(v, torch.Tensor)}
    return {"class": type(stat).__name__, "count": int(stat.count), "dim": int(stat.dim),
            "dtype": str(stat.dtype).removeprefix("torch."), "tensors": tensors}


def statistic_from_state(state: dict) -> Statistic:
    """The statistic :func:`statistic_state` described, on the CPU."""
    classes, todo = {}, [Statistic]
    while todo:
        cls = todo.pop()
        classes[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    stat = classes[state["class"]].__new__(classes[state["class"]])
    Statistic.__init__(stat, state["dim"], "cpu", getattr(torch, state["dtype"]))
    stat.count = state["count"]
    for name, value in state["tensors"].items():
        setattr(stat, name, value)
    return stat


def damped_inverse_cholesky(hessian: torch.Tensor, percdamp: float = 0.01, max_tries: int = 6):
    """Upper Cholesky factor ``U`` of ``(H + damp*I)^{-1}`` (``H^{-1} = U^T U``) and the dead-input mask.

    Dead inputs (``H_jj == 0``: a feature that is always zero) get ``H_jj = 1`` so the factorization
    exists; callers zero those weight columns. Damping is ``percdamp * mean(diag H)`` and grows 10x on
    each failed factorization (docs/methods.md §12).
    """
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    base = percdamp * torch.mean(torch.diag(H))
    eye = torch.arange(H.shape[0], device=H.device)
    for attempt in range(max_tries):
        damped = H.clone()
        damped[eye, eye] += base * (10.0**attempt)
        L, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            inverse = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return U, dead
    raise RuntimeError("Hessian is not positive definite even after heavy damping")
