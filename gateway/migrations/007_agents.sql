-- Each running sandbox's agent (sandbox-image/agent): the port Docker publishes for it on 127.0.0.1,
-- and the secret it requires, made at the start's reservation so that any gateway process can talk to
-- it, and a start interrupted after the container was made can still be adopted.
ALTER TABLE sessions
    ADD COLUMN agent_port   integer CHECK (agent_port BETWEEN 1 AND 65535),
    ADD COLUMN agent_secret text;
