"""Hands work to hale from a script and waits for the results, over the admin API.

    HALE_URL=http://127.0.0.1:7700 HALE_TOKEN=$(cat hale-data/admin.token) \
        python3 submit_and_wait.py tides volcanoes

It submits one plan (planner.py splits it into research tasks), waits for it, then for
each research task, and prints their results. Run it again with the same topics: the
idempotency key names the same plan, so nothing is submitted twice.
"""

import sys
import time
from typing import List

import hale


def wait(admin: hale.SyncAdmin, task: int, seconds: float = 60.0) -> hale.admin.TaskInfo:
    deadline = time.monotonic() + seconds
    while True:
        info = admin.task(task)
        if info.status in ("completed", "failed", "cancelled"):
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {task} is still {info.status} after {seconds} s")
        time.sleep(0.2)


def main(topics: List[str]) -> None:
    admin = hale.SyncAdmin.from_env()  # HALE_URL, HALE_TOKEN (the admin token)
    plan = admin.submit("planner", {"topics": topics}, idempotency_key="plan:" + ",".join(topics))
    planned = wait(admin, plan.task)
    print(f"plan {plan.task} ({'new' if plan.new else 'submitted before'}): {planned.status}")
    for number in planned.result["subtasks"]:
        done = wait(admin, number)
        print(f"task {number} {done.status}: {done.result}")


main(sys.argv[1:])
