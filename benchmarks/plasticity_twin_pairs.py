"""The twin pairs of a finished plasticity run's final model (incoming-weight cosine > 0.99): each pair with its members'
BatchNorm |gamma| and incoming-weight norm over their layer's median. Usage: PYTHONPATH=src python benchmarks/plasticity_twin_pairs.py RUN_DIR"""
import sys, torch
from tailwise.deploy import load_model
from tailwise.compress.groups import channel_groups
from tailwise.methods.plasticity.twins import incoming_vectors
run = sys.argv[1]
m = load_model(run + "/model").eval()
groups = channel_groups(m, torch.zeros(1, 3, 32, 32), "internal")
rows = []
for g in groups:
    v = incoming_vectors(m, g); n = v.norm(dim=1); u = v / n[:, None].clamp_min(1e-30)
    cos = u @ u.T; cos.fill_diagonal_(-1)
    bn = [s for s in g.slices if s.tensor_name == "weight" and "bn" in s.module_name]
    gam = getattr(m.get_submodule(bn[0].module_name), "weight").detach().abs() if bn else None
    for i, j in (cos > 0.99).nonzero().tolist():
        if i < j:
            rows.append((g.name, i, j, float(cos[i, j]), float(gam[i] / gam.median()), float(gam[j] / gam.median()),
                         float(n[i] / n.median()), float(n[j] / n.median())))
print(len(rows), "pairs")
for r in rows:
    print("%-16s %3d %3d cos %.4f |g|/med %.2f %.2f  |w|/med %.2f %.2f" % r)
import statistics
if rows:
    print("median |g|/med over twin members:", statistics.median([x for r in rows for x in r[4:6]]),
          " median |w|/med:", statistics.median([x for r in rows for x in r[6:8]]))
