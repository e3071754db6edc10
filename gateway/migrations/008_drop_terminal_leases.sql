-- Terminals belong to each sandbox's agent now (sandbox-image/agent/sandbox_agent/terminals.py): a
-- gateway that dies only detaches its sockets, and the agent ends what nobody reattaches. The leases
-- that let another gateway hang up a dead gateway's shells (006) have nothing left to do.
DROP TABLE IF EXISTS terminal_leases;
