"""The agent on the robot: sensor intake, serving, learning jobs, checkpoints, control and consoles."""
