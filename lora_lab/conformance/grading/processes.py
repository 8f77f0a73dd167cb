"""The processes of one grading run: the learner's files in one, each reference solution in its own."""

from __future__ import annotations

from pathlib import Path

from lora_lab.conformance.isolation.proxy import RemoteTarget


class Processes:
    """The isolated processes of one grading run: one warm process for the learner's files, one per reference solution.

    The learner's files are loaded one after another into the same process (so one exercise can import another,
    and grading pays one start-up); after a crash, a hang or an error a fresh one takes over.
    """

    def __init__(self) -> None:
        self.learner: RemoteTarget | None = None
        self.prestarted = False  # the learner's process was started on the first file and has not graded it yet
        self.solutions: dict[str, RemoteTarget] = {}

    def prestart_solutions(self, modules: list[str]) -> None:
        """Start each solution's process now, without waiting: they import while the grader imports the suite."""
        for module in dict.fromkeys(modules):
            if module not in self.solutions:
                self.solutions[module] = RemoteTarget(module, wait=False)

    def prestart_learner(self, path: Path, folder: Path, chain: bool = False) -> None:
        """Start the learner's process on its first file now, without waiting (``learner_file`` then takes it)."""
        self.learner = RemoteTarget(str(path), learner_folder=str(folder), chain=chain, wait=False)
        self.prestarted = True

    def solution(self, module: str) -> RemoteTarget:
        if module not in self.solutions:
            self.solutions[module] = RemoteTarget(module)
        target = self.solutions[module]
        target.wait()
        return target

    def learner_file(self, path: Path, folder: Path, chain: bool = False) -> RemoteTarget:
        if self.learner is None:
            self.learner = RemoteTarget(str(path), learner_folder=str(folder), chain=chain)
        elif self.prestarted and self.learner.spec == str(path):
            self.prestarted = False
            self.learner.wait()
        else:
            self.learner.retarget(str(path), str(folder), chain=chain)
        self.prestarted = False
        return self.learner

    def close(self) -> None:
        for target in [self.learner, *self.solutions.values()]:
            if target is not None:
                target.close()

