-- Orthanc: send each chest radiograph to ddn-node once its study is stable, exactly once.
--
-- OnStableStudy fires again whenever the study changes - also when the node's own results
-- (SR, Parametric Map, Secondary Capture) arrive - so forwarding "the study" would send the
-- node its results and every image again, for ever. Instead each CR/DX instance that did
-- not come from the node is forwarded once and then marked (user metadata DdnForwarded,
-- declared in orthanc-ddn-node.json): a stable event with nothing new sends nothing, and a
-- late image goes alone (the node then re-analyses the study and supersedes its SR).
-- The node itself never analyses its own or other AI results either: this is the first of
-- two guards.

local NODE = 'ddn-node'        -- the node's entry in DicomModalities
local NODE_AET = 'DDN_NODE'    -- the AE title the node sends its results with
local MODALITIES = { CR = true, DX = true }

local function fresh_images(studyId)
  local out = {}
  for _, series in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    if MODALITIES[series['MainDicomTags']['Modality'] or ''] then
      for _, id in ipairs(series['Instances']) do
        local meta = ParseJson(RestApiGet('/instances/' .. id .. '/metadata?expand'))
        if meta['RemoteAET'] ~= NODE_AET and meta['DdnForwarded'] == nil then
          table.insert(out, id)
        end
      end
    end
  end
  return out
end

function OnStableStudy(studyId, tags, metadata)
  local images = fresh_images(studyId)
  if #images == 0 then
    return
  end
  local ok, err = pcall(RestApiPost, '/modalities/' .. NODE .. '/store', DumpJson({ Resources = images }))
  if not ok then
    -- Not marked: the next change of the study tries again.
    print('ddn-node: forwarding ' .. #images .. ' instance(s) of study ' .. studyId .. ' failed: ' .. tostring(err))
    return
  end
  for _, id in ipairs(images) do
    RestApiPut('/instances/' .. id .. '/metadata/DdnForwarded', 'yes')
  end
  print('ddn-node: forwarded ' .. #images .. ' instance(s) of study ' .. studyId)
end
