"""The learned policy: decision features, experience collection, d3rlpy training (``offline``), FullInfo,
teacher-forced replay, heuristics, the hindsight oracle and the one policy grammar (``spec``)."""
