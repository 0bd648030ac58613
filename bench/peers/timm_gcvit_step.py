"""Peer figure for `ddetr bench step --backbone gc_vit_*`: one training step of timm's GCViT
backbone alone (forward through every stage, loss = sum over stages 1-3 of the mean squared
output, backward, AdamW), built for the image size (timm's windows follow `img_size`), stochastic
depth 0.2 as TAO's detection GCViT, in train mode, on CPU.
Usage: python timm_gcvit_step.py <variant: xxtiny|xtiny|tiny|small|base|large> batch size steps threads"""
import sys, time, torch, timm

variant, batch, size, steps, threads = sys.argv[1], *map(int, sys.argv[2:6])
torch.manual_seed(0)
torch.set_num_threads(threads)
model = timm.create_model(f"gcvit_{variant}", pretrained=False, img_size=size, num_classes=0,
                          drop_path_rate=0.2).train()
opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)
x = torch.randn(batch, 3, size, size)
print(f"params={sum(p.numel() for p in model.parameters())}")
times = []
for i in range(steps + 1):
    t0 = time.perf_counter()
    y = model.stem(x)
    loss = 0.0
    for s, stage in enumerate(model.stages):
        y = stage(y)
        if s >= 1:
            loss = loss + y.square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    times.append(time.perf_counter() - t0)
    print(f"step {i} loss={loss.item():.4f} {times[-1]:.3f}s", flush=True)
s = sorted(times[1:])
print(f"timm-gcvit variant={variant} batch={batch} size={size} median_step={s[len(s)//2]:.4f}s")
