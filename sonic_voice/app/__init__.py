"""Assembling the stack: the all-in-one runner (:mod:`.cli`), the nodes in one process
(:mod:`.stack`), the offline demo (:mod:`.demo`) and the live log (:mod:`.monitor`).
Only this layer (and the tests) may import ``sonic_voice.emulators``."""
