-- Webhook events into the outbox stream P:webhooks (consumer group "dispatchers", server/webhooks/). Not a script
-- of its own: the loader puts it in front of the scripts that change a job in a way a webhook reports, so the
-- event is written in the same step as the change and cannot be lost between the two.
-- An entry: _event, _at (unix time), then the job's hash as it is now (what the body is made of).

-- The event, if the job at job_key asked for it (its webhook_events, comma-separated).
local function webhook_event(prefix, job_key, event, now)
  local wanted = redis.call('HGET', job_key, 'webhook_events')
  if not wanted or not string.find(',' .. wanted .. ',', ',' .. event .. ',', 1, true) then return end
  redis.call('XADD', prefix .. ':webhooks', '*', '_event', event, '_at', now, unpack(redis.call('HGETALL', job_key)))
end

