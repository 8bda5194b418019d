"""``workers: N``: one daemon process binds the listeners, N worker processes serve them.

* :mod:`.daemon`: the daemon (sockets, spawning, restarts, reload, drain, sd_notify);
* :mod:`.processes`: one worker process as the daemon sees it;
* :mod:`.worker`: the worker's own program (``python -m relayd.workers.worker``);
* :mod:`.channel`: the control channel between them (calls, casts, passed sockets);
* :mod:`.store`: the memory store the daemon holds for every worker;
* :mod:`.merge`, :mod:`.admin`: the one view of all workers (metrics, admin answers).

docs/operations.md ("Workers") says what is per worker and what is shared.
"""
