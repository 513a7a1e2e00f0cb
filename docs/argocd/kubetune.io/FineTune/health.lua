-- Argo CD health of a kubetune.io FineTune (install: see docs/gitops/README.md).
local hs = { status = "Progressing", message = "Waiting for the operator" }
if obj.status == nil then
  return hs
end
local gen = obj.metadata.generation
if gen ~= nil and obj.status.observedGeneration ~= nil and obj.status.observedGeneration < gen then
  hs.message = "Waiting for the operator to observe generation " .. gen
  return hs
end
local phase = obj.status.phase
local message = obj.status.message or phase or ""
if phase == "Succeeded" then
  hs.status = "Healthy"
elseif phase == "Failed" then
  hs.status = "Degraded"
elseif phase == "Suspended" then
  hs.status = "Suspended"
else
  hs.status = "Progressing"
end
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "Stalled" and c.status == "True" then
      hs.status = "Degraded"
      message = c.reason .. ": " .. (c.message or "")
    end
  end
end
hs.message = message
return hs
