import subprocess, sys
cases = {
 "compact_kv bad dtype (cuda)": "import torch, casakv_vllm._C; kv=torch.zeros(4,2,16,256,dtype=torch.bfloat16,device='cuda'); bt=torch.zeros(1,4,dtype=torch.int64,device='cuda'); k=torch.zeros(1,2,3,dtype=torch.int32,device='cuda'); c=torch.zeros(1,2,dtype=torch.int32,device='cuda'); torch.ops.casakv.compact_kv(kv,bt,k,c,torch.zeros(1,2,3,256,dtype=torch.bfloat16,device='cuda'))",
 "sparse_decode_split bad head (meta)": "import torch, casakv_vllm._C; e=lambda *s, dt=torch.bfloat16: torch.empty(*s, dtype=dt, device='meta'); i=lambda *s: torch.zeros(*s, dtype=torch.int32, device='meta'); torch.ops.casakv.sparse_decode_split(e(2,8,96), e(10,2,16,192), i(2,10), i(2), i(2,2,10), i(2,2), 1.0, 4, 3, 4, e(2,8,96), None, e(2,8,4,96,dt=torch.float32), e(2,8,4,dt=torch.float32), e(2,8,4,dt=torch.float32), None)",
 "sparse_decode_split bad head (cuda)": "import torch, casakv_vllm._C; e=lambda *s, dt=torch.bfloat16: torch.empty(*s, dtype=dt, device='cuda'); i=lambda *s: torch.zeros(*s, dtype=torch.int32, device='cuda'); torch.ops.casakv.sparse_decode_split(e(2,8,96), e(10,2,16,192), i(2,10), i(2), i(2,2,10), i(2,2), 1.0, 4, 3, 4, e(2,8,96), None, e(2,8,4,96,dt=torch.float32), e(2,8,4,dt=torch.float32), e(2,8,4,dt=torch.float32), None)",
}
for name, code in cases.items():
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/tmp")
    print(f"{name}: rc {r.returncode}; {(r.stderr.strip().splitlines() or [''])[-1][:200]}")
