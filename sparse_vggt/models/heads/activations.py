"""Output activations of VGGT's heads (reference conventions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def activate_pose(raw: torch.Tensor, trans_act: str = "linear", quat_act: str = "linear",
                  fl_act: str = "linear") -> torch.Tensor:
    """Raw 9-d pose encoding [T(3), quat xyzw(4), fov h/w(2)] -> activated encoding (per-part activation)."""
    return torch.cat([_act(raw[..., :3], trans_act), _act(raw[..., 3:7], quat_act), _act(raw[..., 7:], fl_act)],
                     dim=-1)


def _act(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "linear":
        return x
    if kind == "inv_log":
        return torch.sign(x) * torch.expm1(x.abs())
    if kind == "exp":
        return torch.exp(x)
    if kind == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {kind!r}")


def activate_head(out: torch.Tensor, activation: str = "exp", conf_activation: str = "expp1"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) head output -> (values (N, H, W, C-1), confidence (N, H, W)); last channel = confidence."""
    fmap = out.permute(0, 2, 3, 1)
    values, conf = fmap[..., :-1], fmap[..., -1]
    if activation == "norm_exp":
        d = values.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        values = values / d * torch.expm1(d)
    elif activation == "relu":
        values = F.relu(values)
    elif activation != "linear":
        values = _act(values, activation)
    if conf_activation == "expp1":
        conf = 1 + conf.exp()
    elif conf_activation == "expp0":
        conf = conf.exp()
    elif conf_activation == "sigmoid":
        conf = torch.sigmoid(conf)
    else:
        raise ValueError(f"unknown confidence activation {conf_activation!r}")
    return values, conf
