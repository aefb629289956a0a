"""Peer side of the MuSc check (runs in the peer venv with the xrli-U/MuSc checkout on PYTHONPATH).

Reads {tokens: [layers] x [N, 1+g*g, E] (CLS first), cls: [N, E], r_list, topmin, k_list}; writes the official
LNAMD features per (r, layer) (L2-normalised, as models/musc.py does), MSM per (r, layer), the layer/r means, the
image scores (map maxima) and RsCIN's re-scored image scores. The sequence follows models/musc.py
make_category_data (the bilinear align_corners=True upsampling keeps the grid maximum, so the max is taken on the
grid)."""
import sys

import numpy as np
import torch

from models.modules._LNAMD import LNAMD
from models.modules._MSM import MSM
from models.modules._RsCIN import RsCIN

inp = torch.load(sys.argv[1])
tokens, cls = inp["tokens"], inp["cls"]
n_layers = len(tokens)
out = {"lnamd": {}, "msm": {}}
maps_r = []
for r in inp["r_list"]:
    lnamd = LNAMD(device="cpu", r=r, feature_dim=tokens[0].shape[-1], feature_layer=list(range(n_layers)))
    with torch.no_grad():
        f = lnamd._embed([t.clone() for t in tokens])
        f /= f.norm(dim=-1, keepdim=True)
    maps_l = []
    for l in range(n_layers):
        z = f[:, :, l, :].contiguous()
        out["lnamd"][(r, l)] = z
        m = MSM(Z=z, device="cpu", topmin_min=0, topmin_max=inp["topmin"])
        out["msm"][(r, l)] = m
        maps_l.append(m)
    maps_r.append(torch.stack(maps_l).mean(0))
patch = torch.stack(maps_r).mean(0)                       # [N, g*g]
out["patch"] = patch
image = patch.numpy().max(-1)
out["image"] = torch.from_numpy(np.array(image))
out["rscin"] = torch.from_numpy(np.array(RsCIN(image, [c.numpy() for c in cls], k_list=inp["k_list"])))
torch.save(out, sys.argv[2])
