"""`gemserve eval` with GemFilter's fused scoring merged by the mean of the two rankings (not the max)."""
import sys
import torch
import torch.nn.functional as F
import compressors.gemfilter as gf

def pooled_scores(scores, kernel_size):
    n = scores.shape[-1]
    rows = scores.reshape(-1, 1, n).to(torch.float32)
    pooled = F.avg_pool1d(rows, kernel_size=kernel_size, padding=kernel_size // 2, stride=1).view(-1, n)
    if pooled.shape[0] > 1:
        pooled = (pooled.argsort(dim=-1).argsort(dim=-1).to(torch.float32) / n).mean(dim=0)
    return pooled.view(n).clone()

gf.pooled_scores = pooled_scores
from cli.main import main
sys.exit(main(sys.argv[1:]))
