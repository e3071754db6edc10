import asyncio, subprocess, aiodocker, os
from bench.common import running_gateway
from bench.proxy import start_upstream, USER
async def main():
    async with running_gateway() as gateway, aiodocker.Docker() as docker:
        up = await start_upstream(gateway, docker)
        port = gateway.url.rsplit(":",1)[1]
        h = {"Host": gateway.settings.preview_host, **gateway.headers(USER)}
        args = []
        for k,v in h.items(): args += ["-H", f"{k}: {v}"]
        url = f"http://127.0.0.1:{port}/preview/{USER}/small"
        spy = subprocess.Popen(["py-spy","record","-p",str(gateway.pid),"-d","8","-r","300","-f","raw","-o","/tmp/prof.txt"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL)
        r = subprocess.run(["wrk","-t2","-c16","-d8s",*args,url],capture_output=True,text=True); print(r.stdout.split("Requests/sec:")[1].split()[0])
        spy.wait()
asyncio.run(main())
