"""The learner and everything it is measured with.

Side network over backbone taps, replay buffer,
continual-learning strategies (one short file each under ``training.strategies``), metrics and
scenarios.

    from training.model import ModelConfig, SideNetwork
    from training.registry import create
    from training.taskdata import TaskData

    model = SideNetwork(ModelConfig(tap_dims={"image": [40, 112], "audio": [48, 96]}))
    strategy = create("replay", model)
    strategy.learn_task(task_data)          # TaskData: taps + present mask + labels + task id

Importing this package imports neither torch nor numpy; submodules do.
"""
