"""Stand-ins for the Bedrock APIs the tools layer calls besides Nova Sonic.

- Bedrock Runtime ``ConverseStream`` (what Strands' BedrockModel calls through boto3):
  scripted assistant turns, including the agent's own tool use, as an AWS event stream.
- Bedrock Agent Runtime ``Retrieve`` (Knowledge Bases): BM25 over a local folder.

Both on one loopback HTTP server (boto3 with ``endpoint_url``); see :mod:`.server`.
"""

from sonic_voice.emulators.agents.server import AgentsEmulator, AgentsEmulatorThread

__all__ = ["AgentsEmulator", "AgentsEmulatorThread"]
