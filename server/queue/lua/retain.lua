-- Retention of finished jobs. Not a script of its own: the loader puts it in front of the scripts that
-- give a job its final state (cancel, start, finish, dead_letter), after lua/webhook.lua.
--   done     sorted set of finished jobs: score = finish time, member = "<id> <image count> <bytes>"
--   bytes    the members' total bytes (their job hashes and images)
--   evicted  how many jobs were ever evicted to stay within the caps
-- Each finished job keeps its keys for the TTL; beyond the count or byte cap the oldest are deleted first.

-- The key names at KEYS[k..k+2] and ARGV[a..a+3] = prefix, ttl, max jobs, max bytes (0 = no cap).
local function retention(k, a)
  return {
    done = KEYS[k], bytes = KEYS[k + 1], evicted = KEYS[k + 2],
    prefix = ARGV[a], ttl = tonumber(ARGV[a + 1]),
    max_jobs = tonumber(ARGV[a + 2]), max_bytes = tonumber(ARGV[a + 3]),
  }
end

-- Delete a member's keys; returns the new total.
local function forget(r, member)
  local id, images, size = string.match(member, '^(%S+) (%d+) (%d+)$')
  redis.call('DEL', r.prefix .. ':job:' .. id)
  for i = 0, tonumber(images) - 1 do redis.call('DEL', r.prefix .. ':img:' .. id .. ':' .. i) end
  return redis.call('DECRBY', r.bytes, size)
end

-- The job at job_key reached its final state at `now`, with `images` images of `image_bytes` bytes.
-- Its input image and step preview are no longer needed.
local function retain(r, job_key, job_id, now, images, image_bytes)
  webhook_event(r.prefix, job_key, 'completed', now)  -- lua/webhook.lua
  now = tonumber(now)
  redis.call('DEL', r.prefix .. ':input:' .. job_id, r.prefix .. ':preview:' .. job_id)
  local size = image_bytes
  for _, part in ipairs(redis.call('HGETALL', job_key)) do size = size + #part end
  redis.call('ZADD', r.done, now, job_id .. ' ' .. images .. ' ' .. size)
  local total = redis.call('INCRBY', r.bytes, size)
  -- Entries past the TTL: Redis expired their keys already; the index and the total forget them here.
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', r.done, '-inf', now - r.ttl, 'LIMIT', 0, 100)) do
    redis.call('ZREM', r.done, member)
    total = forget(r, member)
  end
  -- The newest stays even alone over the byte cap: its client is about to read it.
  local count, evicted = redis.call('ZCARD', r.done), 0
  while count > 1 and ((r.max_jobs > 0 and count > r.max_jobs) or (r.max_bytes > 0 and total > r.max_bytes)) do
    total = forget(r, redis.call('ZPOPMIN', r.done)[1])
    count, evicted = count - 1, evicted + 1
  end
  if evicted > 0 then redis.call('INCRBY', r.evicted, evicted) end
end

