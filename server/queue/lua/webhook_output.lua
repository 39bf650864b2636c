-- KEYS: job...   ARGV: prefix, now
-- `output` webhook events of running jobs (after progress.lua recorded the step; the worker picks the jobs due).
for i = 1, #KEYS do
  if redis.call('HGET', KEYS[i], 'status') == 'running' then webhook_event(ARGV[1], KEYS[i], 'output', ARGV[2]) end
end
return 1
